"""The COCO-80 object vocabulary of CHAIR (Rohrbach et al., 2018, "Object Hallucination in Image
Captioning"), as data.

`COCO_SYNONYMS` maps each of the 80 COCO categories to the words and phrases that name it, as the
reference implementation's `data/synonyms.txt` (github.com/LisaAnne/Hallucination) lists them:
same categories, same synonyms, same order, with the file's repeated entries (e.g. "bike" twice
under bicycle) kept once and the category's own name left out of its tuple. Entries are singular;
`mmpo_jax.evaluation.chair` adds plural forms. The table keeps the file's quirks on purpose
("televison", "phon", "knive", "solider" are misspellings or singularisation artefacts that the
reference matches), except "iPhone", lower-cased here because captions are matched lower-case (the
reference lower-cases captions too, so its "iPhone" could never match).

`PHRASE_REWRITES` holds the reference's hard-coded two-word rules: qualifiers that would otherwise
fire "person" ("baby bird" is a bird, "passenger jet" a jet) and phrases that name no COCO object
although a word in them does ("train track", "home plate"); the value is the word the phrase counts
as (looked up in the table; a word not in it means no mention). The reference also drops "seat"
(chair) from a caption that mentions a toilet; `chair.coco_mentions` applies that rule.
"""

from __future__ import annotations

COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    'person': (
        'girl', 'boy', 'man', 'woman', 'kid', 'child', 'chef', 'baker', 'people', 'adult', 'rider',
        'children', 'baby', 'worker', 'passenger', 'sister', 'biker', 'policeman', 'cop', 'officer', 'lady',
        'cowboy', 'bride', 'groom', 'male', 'female', 'guy', 'traveler', 'mother', 'father', 'gentleman',
        'pitcher', 'player', 'skier', 'snowboarder', 'skater', 'skateboarder', 'foreigner', 'caller',
        'offender', 'coworker', 'trespasser', 'patient', 'politician', 'soldier', 'grandchild',
        'serviceman', 'walker', 'drinker', 'doctor', 'bicyclist', 'thief', 'buyer', 'teenager', 'student',
        'camper', 'driver', 'solider', 'hunter', 'shopper', 'villager'
    ),
    'bicycle': ('bike', 'unicycle', 'minibike', 'trike'),
    'car': (
        'automobile', 'van', 'minivan', 'sedan', 'suv', 'hatchback', 'cab', 'jeep', 'coupe', 'taxicab',
        'limo', 'taxi'
    ),
    'motorcycle': ('scooter', 'motor bike', 'motor cycle', 'motorbike', 'moped'),
    'airplane': (
        'jetliner', 'plane', 'air plane', 'monoplane', 'aircraft', 'jet', 'airbus', 'biplane', 'seaplane'
    ),
    'bus': ('minibus', 'trolley'),
    'train': ('locomotive', 'tramway', 'caboose'),
    'truck': ('pickup', 'lorry', 'hauler', 'firetruck'),
    'boat': (
        'ship', 'liner', 'sailboat', 'motorboat', 'dinghy', 'powerboat', 'speedboat', 'canoe', 'skiff',
        'yacht', 'kayak', 'catamaran', 'pontoon', 'houseboat', 'vessel', 'rowboat', 'trawler', 'ferryboat',
        'watercraft', 'tugboat', 'schooner', 'barge', 'ferry', 'sailboard', 'paddleboat', 'lifeboat',
        'freighter', 'steamboat', 'riverboat', 'battleship', 'steamship'
    ),
    'traffic light': ('street light', 'traffic signal', 'stop light', 'streetlight', 'stoplight'),
    'fire hydrant': ('hydrant',),
    'stop sign': (),
    'parking meter': (),
    'bench': ('pew',),
    'bird': (
        'ostrich', 'owl', 'seagull', 'goose', 'duck', 'parakeet', 'falcon', 'robin', 'pelican', 'waterfowl',
        'heron', 'hummingbird', 'mallard', 'finch', 'pigeon', 'sparrow', 'seabird', 'osprey', 'blackbird',
        'fowl', 'shorebird', 'woodpecker', 'egret', 'chickadee', 'quail', 'bluebird', 'kingfisher',
        'buzzard', 'willet', 'gull', 'swan', 'bluejay', 'flamingo', 'cormorant', 'parrot', 'loon',
        'gosling', 'waterbird', 'pheasant', 'rooster', 'sandpiper', 'crow', 'raven', 'turkey', 'oriole',
        'cowbird', 'warbler', 'magpie', 'peacock', 'cockatiel', 'lorikeet', 'puffin', 'vulture', 'condor',
        'macaw', 'peafowl', 'cockatoo', 'songbird'
    ),
    'cat': ('kitten', 'feline', 'tabby'),
    'dog': (
        'puppy', 'beagle', 'pup', 'chihuahua', 'schnauzer', 'dachshund', 'rottweiler', 'canine', 'pitbull',
        'collie', 'pug', 'terrier', 'poodle', 'labrador', 'doggie', 'doberman', 'mutt', 'doggy', 'spaniel',
        'bulldog', 'sheepdog', 'weimaraner', 'corgi', 'cocker', 'greyhound', 'retriever', 'brindle',
        'hound', 'whippet', 'husky'
    ),
    'horse': (
        'colt', 'pony', 'racehorse', 'stallion', 'equine', 'mare', 'foal', 'palomino', 'mustang',
        'clydesdale', 'bronc', 'bronco'
    ),
    'sheep': ('lamb', 'ram', 'goat', 'ewe'),
    'cow': ('cattle', 'oxen', 'ox', 'calf', 'holstein', 'heifer', 'buffalo', 'bull', 'zebu', 'bison'),
    'elephant': (),
    'bear': ('panda',),
    'zebra': (),
    'giraffe': (),
    'backpack': ('knapsack',),
    'umbrella': (),
    'handbag': ('wallet', 'purse', 'briefcase'),
    'tie': ('bow', 'bow tie'),
    'suitcase': ('suit case', 'luggage'),
    'frisbee': (),
    'skis': ('ski',),
    'snowboard': (),
    'sports ball': ('ball',),
    'kite': (),
    'baseball bat': (),
    'baseball glove': (),
    'skateboard': (),
    'surfboard': ('longboard', 'skimboard', 'shortboard', 'wakeboard'),
    'tennis racket': ('racket',),
    'bottle': (),
    'wine glass': (),
    'cup': (),
    'fork': (),
    'knife': ('pocketknife', 'knive'),
    'spoon': (),
    'bowl': ('container',),
    'banana': (),
    'apple': (),
    'sandwich': ('burger', 'sub', 'cheeseburger', 'hamburger'),
    'orange': (),
    'broccoli': (),
    'carrot': (),
    'hot dog': (),
    'pizza': (),
    'donut': ('doughnut', 'bagel'),
    'cake': ('cheesecake', 'cupcake', 'shortcake', 'coffeecake', 'pancake'),
    'chair': ('seat', 'stool'),
    'couch': ('sofa', 'recliner', 'futon', 'loveseat', 'settee', 'chesterfield'),
    'potted plant': ('houseplant',),
    'bed': (),
    'dining table': ('table', 'desk'),
    'toilet': ('urinal', 'commode', 'lavatory', 'potty'),
    'tv': ('monitor', 'televison', 'television'),
    'laptop': ('computer', 'notebook', 'netbook', 'lenovo', 'macbook', 'laptop computer'),
    'mouse': (),
    'remote': (),
    'keyboard': (),
    'cell phone': ('mobile phone', 'phone', 'cellphone', 'telephone', 'phon', 'smartphone', 'iphone'),
    'microwave': (),
    'oven': ('stovetop', 'stove', 'stove top oven'),
    'toaster': (),
    'sink': (),
    'refrigerator': ('fridge', 'freezer'),
    'book': (),
    'clock': (),
    'vase': (),
    'scissors': (),
    'teddy bear': ('teddybear',),
    'hair drier': ('hairdryer',),
    'toothbrush': (),
}

_ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
PHRASE_REWRITES: dict[str, str] = {
    **{f"{qualifier} {animal}": animal for qualifier in ("baby", "adult") for animal in _ANIMAL_WORDS},
    "passenger jet": "jet",
    "passenger train": "train",
    "bow tie": "tie",
    "toilet seat": "toilet",
    "home plate": "home plate",
    "train track": "train track",
}
