"""Build the bundled task-tuning mix: four small classification tasks, written for kvlens (CC0-1.0).

    .venv/bin/python data/tasks/build_tasks.py      # writes data/tasks/<task>.json
    .venv/bin/python data/check_tasks.py            # checks them on the embedded model

Every sentence, word list and label below was written by the kvlens authors and is released with
the files under CC0-1.0. Each task file holds a prompt template (with ``{text}`` for the input,
and the label set spelled out), the labels, and seeded train/test splits. Entities never cross
splits where an input is built from an entity (the same country, animal or number is never in
both), so the test split measures generalisation, not recall of a training example.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SEED = 2024
TEST_SHARE = 0.3

SENTIMENT_SUBJECTS = [
    "The film", "The soup", "Our trip", "The concert", "This book", "The hotel", "The new phone", "The service",
    "The game", "The lecture", "My day", "The coffee", "The show", "The hike", "The party", "The museum",
    "The meal", "The train ride", "The album", "The class", "The garden", "The festival", "The room",
    "The match",
]
SENTIMENT_PHRASES = {
    "positive": ["was wonderful", "made me smile", "was a delight", "was excellent", "felt warm and friendly",
                 "was great fun", "left me happy", "was a real joy", "was lovely from start to finish",
                 "was better than I hoped", "was brilliant", "made my week"],
    "negative": ["was awful", "made me angry", "was a waste of time", "was boring", "felt cold and rude",
                 "was terrible", "left me disappointed", "was a real mess", "was dull from start to finish",
                 "was worse than I feared", "was dreadful", "ruined my week"],
}

CONTINENTS = {
    "Europe": ["France", "Germany", "Italy", "Spain", "Portugal", "Poland", "Sweden", "Norway", "Finland",
               "Denmark", "Greece", "Austria", "Switzerland", "Belgium", "Ireland", "Hungary", "Romania",
               "Ukraine", "Croatia", "Serbia", "Bulgaria", "the Netherlands", "Iceland", "Estonia", "Latvia",
               "Lithuania", "Slovakia", "Slovenia", "Albania", "the Czech Republic",
               "Paris", "Berlin", "Madrid", "Rome", "Vienna", "Warsaw", "Stockholm", "Oslo", "Lisbon", "Athens",
               "Dublin", "Prague", "Budapest", "Copenhagen", "Helsinki", "Brussels", "Amsterdam", "Milan",
               "Munich", "Barcelona"],
    "Africa": ["Kenya", "Nigeria", "Ethiopia", "Ghana", "Egypt", "Morocco", "Algeria", "Tanzania", "Uganda",
               "Senegal", "Zimbabwe", "Zambia", "Cameroon", "Mali", "Sudan", "Angola", "Mozambique", "Somalia",
               "Rwanda", "Botswana", "Namibia", "Tunisia", "Libya", "Madagascar", "Malawi", "Niger", "Chad",
               "South Africa", "Ivory Coast", "Burkina Faso",
               "Nairobi", "Lagos", "Cairo", "Accra", "Addis Ababa", "Casablanca", "Dakar", "Kampala", "Luanda",
               "Johannesburg", "Cape Town", "Tunis", "Khartoum", "Kinshasa", "Harare", "Lusaka", "Maputo",
               "Kigali", "Algiers", "Marrakesh"],
    "Asia": ["Japan", "China", "India", "Thailand", "Vietnam", "Indonesia", "Malaysia", "Pakistan",
             "Bangladesh", "Nepal", "Mongolia", "South Korea", "Cambodia", "Laos", "Myanmar", "Sri Lanka",
             "Afghanistan", "Kazakhstan", "the Philippines", "Iran", "Iraq", "Saudi Arabia", "Uzbekistan",
             "Bhutan", "Singapore", "Jordan", "Syria", "Oman", "Yemen", "North Korea",
             "Tokyo", "Beijing", "Shanghai", "Delhi", "Mumbai", "Bangkok", "Hanoi", "Jakarta", "Seoul",
             "Manila", "Karachi", "Dhaka", "Kathmandu", "Kyoto", "Osaka", "Kuala Lumpur", "Tehran",
             "Baghdad", "Riyadh", "Kolkata"],
    "North America": ["Canada", "Mexico", "Guatemala", "Honduras", "Cuba", "Panama", "Costa Rica",
                      "the United States", "Nicaragua", "El Salvador", "Jamaica", "Haiti", "Belize",
                      "the Bahamas", "Toronto", "Vancouver", "Montreal", "Chicago", "New York City",
                      "Los Angeles", "Mexico City", "Havana", "Houston", "Boston", "San Francisco", "Seattle",
                      "Miami", "Ottawa", "Guadalajara", "Denver"],
    "South America": ["Brazil", "Argentina", "Chile", "Peru", "Colombia", "Venezuela", "Ecuador", "Bolivia",
                      "Paraguay", "Uruguay", "Guyana", "Suriname", "Buenos Aires", "Rio de Janeiro",
                      "São Paulo", "Lima", "Bogotá", "Santiago", "Caracas", "Quito", "Montevideo", "La Paz",
                      "Medellín", "Brasília", "Asunción", "Salvador", "Recife", "Cusco", "Córdoba",
                      "Valparaíso"],
    "Oceania": ["Australia", "New Zealand", "Fiji", "Papua New Guinea", "Samoa", "Tonga", "Vanuatu",
                "the Solomon Islands", "Sydney", "Melbourne", "Auckland", "Wellington", "Brisbane", "Perth",
                "Adelaide", "Canberra", "Christchurch", "Hobart", "Darwin", "Suva"],
}

ANIMALS = {
    "mammal": ["dolphin", "whale", "elephant", "bat", "horse", "lion", "tiger", "kangaroo", "giraffe", "cow",
               "dog", "cat", "rabbit", "mouse", "bear", "wolf", "fox", "deer", "camel", "zebra", "monkey",
               "gorilla", "sheep", "goat", "pig", "otter", "seal", "squirrel", "hedgehog", "koala"],
    "bird": ["eagle", "penguin", "ostrich", "parrot", "owl", "sparrow", "flamingo", "pigeon", "crow", "swan",
             "duck", "goose", "hen", "robin", "hawk", "falcon", "peacock", "pelican", "seagull", "woodpecker",
             "hummingbird", "stork", "heron", "vulture", "turkey", "canary"],
    "fish": ["salmon", "shark", "tuna", "trout", "cod", "goldfish", "carp", "herring", "sardine", "mackerel",
             "catfish", "perch", "pike", "eel", "swordfish", "anchovy", "halibut", "piranha", "stingray",
             "clownfish"],
    "reptile": ["crocodile", "lizard", "turtle", "iguana", "alligator", "chameleon", "gecko", "snake",
                "python", "cobra", "tortoise", "komodo dragon", "rattlesnake", "viper", "anaconda",
                "boa constrictor", "monitor lizard", "sea turtle"],
    "insect": ["ant", "bee", "butterfly", "mosquito", "beetle", "grasshopper", "cockroach", "dragonfly",
               "wasp", "moth", "fly", "ladybug", "cricket", "termite", "flea", "hornet", "firefly", "locust",
               "bumblebee", "caterpillar"],
}
ANIMAL_FRAMES = ["the {}", "a young {}", "a wild {}"]

TEMPLATES = {
    "sentiment": "Is the sentiment of the sentence positive or negative?\n### Sentence: {text}\n### Answer:",
    "continent": ("On which continent is the place: Africa, Asia, Europe, North America, South America or "
                  "Oceania?\n### Place: {text}\n### Answer:"),
    "parity": "Is the number even or odd?\n### Number: {text}\n### Answer:",
    "animal_class": ("Is the animal a mammal, bird, fish, reptile or insect?\n### Animal: {text}\n"
                     "### Answer:"),
}


def split(groups: dict[str, list[dict]], rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Seeded split by group (an entity), stratified by the group's first label: every group goes
    wholly to train or to test, and each label sends about ``TEST_SHARE`` of its groups to test."""
    by_label: dict[str, list[str]] = {}
    for key in sorted(groups):
        by_label.setdefault(groups[key][0]["label"], []).append(key)
    train, test = [], []
    for label in sorted(by_label):
        keys = by_label[label]
        rng.shuffle(keys)
        n_test = max(1, round(TEST_SHARE * len(keys)))
        test += [e for k in keys[:n_test] for e in groups[k]]
        train += [e for k in keys[n_test:] for e in groups[k]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def sentiment(rng: random.Random) -> dict[str, list[dict]]:
    """Subject x phrase sentences; grouped by subject, so test subjects are unseen."""
    groups: dict[str, list[dict]] = {}
    for subject in SENTIMENT_SUBJECTS:
        groups[subject] = [{"text": f"{subject} {phrase}.", "label": label}
                           for label, phrases in SENTIMENT_PHRASES.items() for phrase in phrases]
    return groups


def continent(rng: random.Random) -> dict[str, list[dict]]:
    return {place: [{"text": place, "label": label}] for label, places in CONTINENTS.items() for place in places}


def parity(rng: random.Random) -> dict[str, list[dict]]:
    numbers = rng.sample(range(10, 1000), 320)
    return {str(n): [{"text": str(n), "label": "even" if n % 2 == 0 else "odd"}] for n in numbers}


def animal_class(rng: random.Random) -> dict[str, list[dict]]:
    return {animal: [{"text": frame.format(animal), "label": label} for frame in ANIMAL_FRAMES]
            for label, animals in ANIMALS.items() for animal in animals}


BUILDERS = {"sentiment": (sentiment, ["positive", "negative"]),
            "continent": (continent, list(CONTINENTS)),
            "parity": (parity, ["even", "odd"]),
            "animal_class": (animal_class, list(ANIMALS))}


def build(name: str) -> dict:
    """One task as the JSON object :func:`kvlens.tuning.load_task` reads."""
    builder, labels = BUILDERS[name]
    rng = random.Random(f"{SEED}|{name}")
    train, test = split(builder(rng), rng)
    return {"name": name, "licence": "CC0-1.0", "source": "written for kvlens (data/tasks/build_tasks.py)",
            "template": TEMPLATES[name], "labels": labels, "train": train, "test": test}


def main() -> int:
    for name in BUILDERS:
        task = build(name)
        path = HERE / f"{name}.json"
        path.write_text(json.dumps(task, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{path.name}: {len(task['train'])} train, {len(task['test'])} test, labels {task['labels']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
