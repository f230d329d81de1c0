"""Writes the sample corpus for ``make run-local``: 300 short documents with a title and a question.

The documents are composed from the hand-written sentence patterns below (everyday topics: weather,
cooking, local news, science facts, travel, sports, local history, gardening, community events,
animals), filled in and picked with a fixed seed, so every run writes the same files:

    data/sample/part-000.jsonl ... part-002.jsonl   100 rows each: id, title, text, question
    data/sample/parquet/part-000.parquet            the first 100 rows again, as Parquet

Each question is answerable from its document. Run from anywhere: ``python data/sample/make_sample.py``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SEED = 20240611
N_DOCS = 300
ROWS_PER_PART = 100
OUT_DIR = Path(__file__).resolve().parent

Doc = tuple[str, str, str]  # title, text, question

TOWNS = [
    "Millbrook",
    "Ashford",
    "Carrow Bay",
    "Pinehurst",
    "Elderfield",
    "Stonebridge",
    "Harwick",
    "Lowmoor",
    "Fennick",
    "Oakridge",
    "Brackenford",
    "Westhollow",
    "Kestrel Point",
    "Dunmore",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NAMES = [
    "Maria Okafor",
    "Tom Lindqvist",
    "Aisha Rahman",
    "Daniel Brooks",
    "Lena Novak",
    "Samuel Ortiz",
    "Priya Nair",
    "Jonas Weber",
    "Grace Whitfield",
    "Kenji Mori",
    "Fatima Haddad",
    "Oliver Grant",
    "Nadia Petrova",
    "Luis Carvalho",
    "Hannah Kim",
]


def _weather(rng: random.Random) -> Doc:
    town, day = rng.choice(TOWNS), rng.choice(DAYS)
    kind = rng.choice(["storm", "heat", "fog", "snow", "sun"])
    high = {"storm": 14, "heat": 33, "fog": 11, "snow": -2, "sun": 22}[kind] + rng.randint(-3, 3)
    opening = {
        "storm": f"A band of heavy rain swept over {town} on {day}, with gusts strong enough "
        "to bring down several branches along the river path.",
        "heat": f"{town} sweltered through the hottest {day} of the year so far.",
        "fog": f"Thick fog settled over {town} early on {day} and did not lift until almost noon.",
        "snow": f"Residents of {town} woke on {day} to a layer of fresh snow on roofs and cars.",
        "sun": f"After a grey week, {town} finally enjoyed a bright and calm {day}.",
    }[kind]
    middle = rng.choice(
        [
            f"The thermometer at the town hall showed a high of {high} degrees.",
            f"The highest temperature recorded in the town was {high} degrees.",
            f"By mid-afternoon the temperature had reached {high} degrees, the day's peak.",
        ]
    )
    extra = {
        "storm": [
            "Two roads near the harbour were closed for a few hours while crews cleared debris.",
            "The local football match was postponed until the following weekend.",
        ],
        "heat": [
            "The public pool stayed open an extra two hours to let people cool off.",
            "Doctors reminded older residents to drink water and avoid the midday sun.",
        ],
        "fog": [
            "Several morning ferries were delayed because the captains could not see the pier.",
            "Drivers were asked to slow down and switch on their low beams.",
        ],
        "snow": [
            "Schools opened an hour late so that the buses could run safely.",
            "Children spent the afternoon building snowmen in the central square.",
        ],
        "sun": [
            "Cafés put their tables outside, and the park was full by lunchtime.",
            "Farmers used the dry spell to bring in the last of the hay.",
        ],
    }[kind]
    outlook = rng.choice(
        [
            "Forecasters expect similar conditions for the next two days.",
            "A change in the weather is expected by the end of the week.",
            "",
        ]
    )
    rng.shuffle(extra)
    text = " ".join(s for s in [opening, middle, extra[0], outlook] if s)
    title = {
        "storm": f"Storm brings rain and wind to {town}",
        "heat": f"Heat wave grips {town}",
        "fog": f"Morning fog slows {town}",
        "snow": f"Snow blankets {town}",
        "sun": f"Sunshine returns to {town}",
    }[kind]
    return title, text, f"What was the highest temperature in {town} on {day}?"


DISHES = [
    ("lentil soup", "red lentils", 30, "a squeeze of lemon just before serving"),
    ("banana bread", "very ripe bananas", 55, "letting it cool completely before slicing"),
    ("tomato pasta", "canned plum tomatoes", 20, "saving a cup of the pasta water"),
    ("vegetable curry", "sweet potatoes", 40, "frying the spices in oil first"),
    ("oat pancakes", "rolled oats", 15, "resting the batter for ten minutes"),
    ("roast chicken", "a whole chicken", 80, "drying the skin well before roasting"),
    ("mushroom risotto", "arborio rice", 35, "adding the stock one ladle at a time"),
    ("apple crumble", "tart cooking apples", 45, "keeping the butter cold for the topping"),
    ("bean chili", "kidney beans", 50, "adding a square of dark chocolate at the end"),
    ("fish tacos", "white fish fillets", 25, "warming the tortillas in a dry pan"),
]


def _cooking(rng: random.Random) -> Doc:
    dish, main, minutes, tip = rng.choice(DISHES)
    cook = rng.choice(NAMES)
    first = rng.choice(
        [
            f"{cook} has been making {dish} every week for years, and it starts with {main}.",
            f"This week's reader recipe is {dish} from {cook}, built around {main}.",
            f"If you want a simple dinner, {cook} recommends {dish} made with {main}.",
        ]
    )
    second = rng.choice(
        [
            f"From start to finish it takes about {minutes} minutes.",
            f"The whole dish is ready in roughly {minutes} minutes.",
        ]
    )
    third = f"The most important trick, according to {cook.split()[0]}, is {tip}."
    fourth = rng.choice(
        [
            "Leftovers keep well in the fridge for up to three days.",
            "It also freezes well, so it is worth making a double batch.",
            "Serve it with a green salad or some crusty bread.",
            "",
        ]
    )
    text = " ".join(s for s in [first, second, third, fourth] if s)
    question = rng.choice(
        [
            f"How long does the {dish} take to make?",
            f"What is the most important trick for making the {dish}?",
        ]
    )
    return f"A weeknight recipe: {dish}", text, question


PROJECTS = [
    ("a new cycle lane along the main road", "cycle lane"),
    ("longer opening hours at the public library", "library hours"),
    ("a playground next to the old fire station", "playground"),
    ("solar panels on the roof of the sports hall", "solar panels"),
    ("a weekly farmers' market in the station car park", "farmers' market"),
    ("repairs to the stone bridge over the canal", "bridge repairs"),
    ("free evening buses to the hospital", "evening buses"),
    ("planting two hundred trees along the ring road", "tree planting"),
]


def _local_news(rng: random.Random) -> Doc:
    town = rng.choice(TOWNS)
    project, short = rng.choice(PROJECTS)
    yes = rng.randint(5, 11)
    no = rng.randint(0, 4)
    cost = rng.choice([40, 75, 120, 180, 250, 400])
    first = (
        f"The {town} council approved {project} by a vote of {yes} to {no} on {rng.choice(DAYS)}."
    )
    second = rng.choice(
        [
            f"The plan is expected to cost about {cost},000 and will be paid from the town's "
            "reserve fund.",
            f"Officials put the cost at roughly {cost},000, shared with the regional government.",
        ]
    )
    third = rng.choice(
        [
            "Several residents spoke in favour during the public session, citing safety and "
            "convenience.",
            "A few shop owners raised concerns about noise and parking during the work.",
            "Supporters collected more than a thousand signatures before the meeting.",
        ]
    )
    fourth = rng.choice(
        [
            "Work is due to begin in the spring.",
            "The council will review progress again in six months.",
            "",
        ]
    )
    text = " ".join(s for s in [first, second, third, fourth] if s)
    return (
        f"{town} council backs {short}",
        text,
        f"How many council members voted in favour of the {short}?",
    )


SCIENCE = [
    (
        "Octopuses have three hearts",
        "An octopus has three hearts. Two of them pump blood through the gills, while the "
        "third sends it around the rest of the body. Their blood is blue because it carries "
        "oxygen with a copper-based molecule instead of the iron-based one that we use.",
        "Why is octopus blood blue?",
    ),
    (
        "Sunlight is eight minutes old",
        "Light from the Sun takes a little over eight minutes to reach the Earth. When you "
        "look at the Sun, you are really seeing it as it was those few minutes ago. Light from "
        "the Moon, which is much closer, arrives in just over a second.",
        "How long does sunlight take to reach the Earth?",
    ),
    (
        "Water boils sooner on mountains",
        "Water boils at a lower temperature high in the mountains because the air pressure is "
        "lower there. At the top of a tall peak it may boil at around 70 degrees rather than "
        "100. That is why pasta takes longer to cook at altitude.",
        "Why does water boil at a lower temperature in the mountains?",
    ),
    (
        "Bananas count as berries",
        "To a botanist, a banana is a berry, because it grows from a single flower with one "
        "ovary and has its seeds inside the flesh. Strawberries, on the other hand, are not "
        "true berries at all. Everyday names for fruit often ignore these rules.",
        "Why does a botanist call a banana a berry?",
    ),
    (
        "Sound moves faster in water",
        "Sound travels about four times faster through water than through air. Water "
        "molecules are packed more closely, so they pass vibrations along more quickly. "
        "Whales use this to call to each other across great distances.",
        "How much faster does sound travel in water than in air?",
    ),
    (
        "A day on Venus outlasts its year",
        "Venus spins so slowly that one full turn on its axis takes longer than one trip "
        "around the Sun. It also spins in the opposite direction to most planets. On Venus, "
        "the Sun would rise in the west and set in the east.",
        "In which direction would the Sun rise on Venus?",
    ),
    (
        "Honey keeps for a very long time",
        "Honey can stay edible for many years if it is sealed. It holds very little water and "
        "is slightly acidic, so most bacteria cannot grow in it. If it turns cloudy and hard, "
        "gently warming the jar makes it runny again.",
        "Why can most bacteria not grow in honey?",
    ),
    (
        "Trees talk through fungi",
        "Many forest trees are linked underground by thin threads of fungi that wrap around "
        "their roots. Through this network, sugars and water can move from one tree to "
        "another. Older trees may even help nearby seedlings in the shade.",
        "What links many forest trees underground?",
    ),
    (
        "Your bones renew themselves",
        "Bone is living tissue that is constantly being broken down and rebuilt. Over roughly "
        "ten years, most of the adult skeleton is replaced in this way. Exercise and enough "
        "calcium help keep the process balanced.",
        "About how long does it take to replace most of the adult skeleton?",
    ),
    (
        "Lightning is hotter than the Sun's surface",
        "A bolt of lightning heats the air around it to about 30,000 degrees, several times "
        "hotter than the surface of the Sun. The air expands so suddenly that it makes the "
        "shock wave we hear as thunder.",
        "What causes the sound of thunder?",
    ),
    (
        "Bees dance to give directions",
        "Honeybees tell each other where to find flowers by dancing. In the waggle dance, the "
        "angle of the bee's run shows the direction of the food compared with the Sun, and "
        "the length of the run shows how far away it is.",
        "What does the length of the waggle run tell other bees?",
    ),
    (
        "The Moon drifts away",
        "The Moon is moving away from the Earth by about four centimetres each year. Tides "
        "slowly transfer energy from the spinning Earth to the Moon's orbit. As a result, our "
        "days are also getting very slightly longer.",
        "How far does the Moon move away from the Earth each year?",
    ),
    (
        "Snowflakes have six sides",
        "Almost every snowflake has six arms or six sides. The shape comes from the way water "
        "molecules lock together when they freeze. The exact pattern depends on the "
        "temperature and moisture each crystal meets as it falls.",
        "What decides the exact pattern of a snowflake?",
    ),
    (
        "Cats cannot taste sweetness",
        "Cats lack a working gene for the sweet taste receptor, so sugar means nothing to "
        "them. As meat eaters, they never needed it. Dogs, which eat a wider diet, can taste "
        "sweet foods.",
        "Why can cats not taste sweetness?",
    ),
    (
        "Glass is made from sand",
        "Ordinary window glass is made mostly from sand that is melted at around 1,700 "
        "degrees. Soda ash is added so that it melts at a lower temperature, and lime makes "
        "the finished glass less soluble in water.",
        "What is ordinary window glass mostly made from?",
    ),
    (
        "Plants make their own food",
        "Green plants use sunlight to turn water and carbon dioxide into sugar, releasing "
        "oxygen as a by-product. This process, called photosynthesis, takes place in tiny "
        "structures called chloroplasts, which give leaves their green colour.",
        "What gives leaves their green colour?",
    ),
    (
        "Hummingbirds beat their wings fast",
        "Small hummingbirds can beat their wings more than fifty times a second. That lets "
        "them hover in front of a flower and even fly backwards. To fuel this, they must "
        "feed every few minutes during the day.",
        "Why must hummingbirds feed every few minutes?",
    ),
    (
        "Sea water is salty from rocks",
        "The salt in the sea comes mainly from rocks on land. Rain slowly dissolves minerals "
        "and rivers carry them to the ocean. When sea water evaporates, the salt stays "
        "behind, so over millions of years the sea has become salty.",
        "Where does most of the salt in the sea come from?",
    ),
]
SCIENCE_CLOSERS = [
    "Facts like this are a reminder of how much is still happening around us unnoticed.",
    "Scientists continue to study the details.",
    "It is a small fact with a surprisingly long story behind it.",
    "",
]


def _science(rng: random.Random) -> Doc:
    title, body, question = rng.choice(SCIENCE)
    closer = rng.choice(SCIENCE_CLOSERS)
    return title, f"{body} {closer}".strip(), question


TRIPS = [
    ("the coastal villages of the south", "train", "fresh grilled sardines"),
    ("a mountain hut above the lakes", "bus and then on foot", "a sunrise over the glacier"),
    ("the old quarter of a river city", "overnight train", "a boat ride under twelve bridges"),
    ("an island with no cars", "ferry", "cycling around the whole coast in one day"),
    ("a desert town known for its pottery", "car", "a night sky full of stars"),
    ("a quiet valley full of vineyards", "bicycle", "a long lunch at a family farm"),
    ("a northern harbour town", "coach", "watching the fishing fleet come in at dawn"),
]


TRAVEL_WAYS = ["took most of a day", "was cheaper than flying", "turned out to be half the fun"]


def _travel(rng: random.Random) -> Doc:
    name = rng.choice(NAMES)
    first_name = name.split()[0]
    place, transport, highlight = rng.choice(TRIPS)
    nights = rng.randint(2, 9)
    opening = rng.choice(
        [
            f"{name} spent {nights} nights in {place} this autumn.",
            f"Last month {name} took a {nights}-night trip to {place}.",
        ]
    )
    advice = rng.choice(
        [
            f"{first_name}'s advice is to pack light and book rooms early.",
            f"{first_name} says the best time to go is just after the summer crowds leave.",
            "Local guesthouses were friendly and reasonably priced.",
        ]
    )
    text = " ".join(
        [
            opening,
            f"{first_name} travelled there by {transport}, which {rng.choice(TRAVEL_WAYS)}.",
            f"The highlight of the trip was {highlight}.",
            advice,
        ]
    )
    question = rng.choice(
        [
            f"How did {first_name} travel to {place}?",
            f"What was the highlight of {first_name}'s trip?",
        ]
    )
    return f"Travel notes: {place}", text, question


TEAMS = [
    "Millbrook Rovers",
    "Ashford United",
    "Harwick Athletic",
    "Carrow Bay Wanderers",
    "Pinehurst Town",
    "Stonebridge Rangers",
    "Oakridge City",
    "Dunmore Harriers",
]
SPORTS_EXTRA = [
    "The home crowd of about {crowd} stayed on their feet for the last ten minutes.",
    "Rain made the pitch heavy, and both sides struggled to pass the ball cleanly.",
    "The visitors had more of the ball but rarely tested the goalkeeper.",
    "It was the team's {streak} win in a row.",
]


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _sports(rng: random.Random) -> Doc:
    home, away = rng.sample(TEAMS, 2)
    away_goals = rng.randint(0, 2)
    home_goals = away_goals + rng.randint(1, 2)
    scorer = rng.choice(NAMES)
    minute = rng.randint(60, 89)
    extras = rng.sample(SPORTS_EXTRA, 2)
    extras = [
        e.format(
            crowd=f"{rng.choice([800, 1500, 2300, 4100]):,}", streak=rng.choice(["third", "fifth"])
        )
        for e in extras
    ]
    text = " ".join(
        [
            f"{home} beat {away} {home_goals}-{away_goals} on {rng.choice(DAYS)}.",
            f"{scorer} scored the deciding goal in the {_ordinal(minute)} minute with a low shot "
            "from the edge of the box.",
            *extras,
        ]
    )
    return (
        f"{home} edge past {away}",
        text,
        f"Who scored the deciding goal for {home}?",
    )


LANDMARKS = [
    ("clock tower", "a local watchmaker", "the clock ran five minutes fast for its first year"),
    ("covered market", "a group of farmers", "it once flooded so badly that boats sailed inside"),
    ("stone bridge", "two brothers who were masons", "each brother built one half"),
    ("public baths", "a retired sea captain", "the water was heated by a steam engine"),
    ("lighthouse", "the harbour board", "its first keeper kept a diary for forty years"),
    ("village school", "the parish", "classes were held in a barn until it opened"),
    ("windmill", "a miller from the next valley", "it was moved once, piece by piece"),
]


def _history(rng: random.Random) -> Doc:
    town = rng.choice(TOWNS)
    landmark, builder, story = rng.choice(LANDMARKS)
    year = rng.randint(1780, 1925)
    text = " ".join(
        [
            f"The {landmark} in {town} was completed in {year}.",
            f"It was paid for and built by {builder}.",
            f"According to local records, {story}.",
            rng.choice(
                [
                    "Today it is one of the most photographed places in the area.",
                    "Volunteers now open it to visitors on the first Sunday of each month.",
                    "It was restored recently with help from a national heritage fund.",
                ]
            ),
        ]
    )
    return (
        f"The story of the {town} {landmark}",
        text,
        f"In which year was the {landmark} in {town} completed?",
    )


PLANTS = [
    ("tomatoes", "a sunny, sheltered spot", "pinch out the side shoots"),
    ("garlic", "well-drained soil", "plant the cloves in late autumn"),
    ("runner beans", "a tall frame of canes", "water them at the roots every evening"),
    ("lavender", "poor, stony soil", "trim it lightly after flowering"),
    ("strawberries", "a raised bed", "tuck straw under the fruit to keep it clean"),
    ("potatoes", "deep, loose soil", "pile earth around the stems as they grow"),
]


def _gardening(rng: random.Random) -> Doc:
    plant, place, tip = rng.choice(PLANTS)
    gardener = rng.choice(NAMES)
    text = " ".join(
        [
            rng.choice(
                [
                    f"{gardener} has grown {plant} on an allotment for over a decade.",
                    f"Our gardening column this week comes from {gardener}, who grows {plant}.",
                ]
            ),
            f"They do best in {place}.",
            f"The one job not to skip is this: {tip}.",
            rng.choice(
                [
                    "Slugs are the main enemy, so check the beds after rain.",
                    "A thin layer of compost in spring makes a noticeable difference.",
                    "Most beginners get a decent crop in their very first year.",
                ]
            ),
        ]
    )
    question = rng.choice(
        [f"Where do {plant} grow best?", f"Which job should not be skipped when growing {plant}?"]
    )
    return f"Growing {plant}", text, question


EVENTS = [
    ("book fair", "the school hall", "second-hand books for one coin each"),
    ("food festival", "the harbour front", "stalls from more than forty local cooks"),
    ("charity run", "the riverside park", "a five-kilometre route suitable for walkers"),
    ("open-air cinema", "the castle lawn", "a classic comedy shown after sunset"),
    ("repair café", "the community centre", "volunteers fixing lamps, bikes and clothes"),
    ("choir concert", "St Anne's church", "songs from twelve different countries"),
]


def _community(rng: random.Random) -> Doc:
    town = rng.choice(TOWNS)
    event, venue, feature = rng.choice(EVENTS)
    organiser = rng.choice(NAMES)
    visitors = rng.choice([150, 300, 600, 1200, 2500])
    text = " ".join(
        [
            f"The {town} {event} returns to {venue} on {rng.choice(DAYS)}.",
            f"This year it offers {feature}.",
            f"Organiser {organiser} expects around {visitors} visitors if the weather holds.",
            rng.choice(
                [
                    "Entry is free, and any money raised goes to the local food bank.",
                    "Tickets cost a small fee at the gate, and children get in free.",
                    "Volunteers are still needed to help set up in the morning.",
                ]
            ),
        ]
    )
    question = rng.choice(
        [f"Where is the {town} {event} held?", f"How many visitors does {organiser} expect?"]
    )
    return f"{town} {event} this week", text, question


ANIMALS = [
    ("a grey heron", "the canal", "the heron stood completely still for almost an hour"),
    ("a family of otters", "the mill pond", "the otters play near the weir at dusk"),
    ("a barn owl", "the church tower", "the owl has raised four chicks this spring"),
    ("a red squirrel", "the old orchard", "the squirrel buries hazelnuts under one apple tree"),
    ("a pair of swans", "the boating lake", "the swans chased a rowing boat away from their nest"),
    ("a hedgehog", "a garden on Mill Lane", "the hedgehog visits the same saucer of water nightly"),
]


def _animals(rng: random.Random) -> Doc:
    animal, place, behaviour = rng.choice(ANIMALS)
    town = rng.choice(TOWNS)
    spotter = rng.choice(NAMES)
    text = " ".join(
        [
            f"Walkers in {town} have been delighted by {animal} living near {place}.",
            f"According to {spotter}, who first reported the sighting, {behaviour}.",
            rng.choice(
                [
                    "Wildlife volunteers ask people to keep dogs on a lead in the area.",
                    "Photographers have started arriving early in the morning to catch a glimpse.",
                    "The sighting has been added to the county's wildlife survey.",
                ]
            ),
        ]
    )
    return (
        f"Wildlife spotted near {place}",
        text,
        f"Who first reported the sighting of {animal} in {town}?",
    )


FAMILIES: tuple[Callable[[random.Random], Doc], ...] = (
    _weather,
    _cooking,
    _local_news,
    _science,
    _travel,
    _sports,
    _history,
    _gardening,
    _community,
    _animals,
)


def make_docs(n: int = N_DOCS, seed: int = SEED) -> list[dict[str, str]]:
    """``n`` documents, the topic families in a shuffled round-robin, all from ``seed``."""
    rng = random.Random(seed)
    docs = []
    order: list[Callable[[random.Random], Doc]] = []
    for i in range(n):
        if not order:
            order = list(FAMILIES)
            rng.shuffle(order)
        title, text, question = order.pop()(rng)
        docs.append({"id": f"doc-{i + 1:05d}", "title": title, "text": text, "question": question})
    return docs


def write(docs: list[dict[str, str]], out_dir: Path = OUT_DIR) -> None:
    """Writes the JSONL parts and the Parquet copy of the first part."""
    for part, start in enumerate(range(0, len(docs), ROWS_PER_PART)):
        lines = [json.dumps(doc, ensure_ascii=False) for doc in docs[start : start + ROWS_PER_PART]]
        (out_dir / f"part-{part:03d}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out_dir / "parquet").mkdir(exist_ok=True)
    pq.write_table(
        pa.Table.from_pylist(docs[:ROWS_PER_PART]), out_dir / "parquet" / "part-000.parquet"
    )


if __name__ == "__main__":
    write(make_docs())
