"""A synthetic TinyStoriesInstruct look-alike, generated from a small story grammar.

The real corpus needs the Hub or a multi-gigabyte download; this one needs nothing, so the
Quick start, the tests and CI can train a model end to end anywhere. It keeps the real
layout (``Features:`` / ``Words:`` / ``Summary:`` / optional ``Random sentence:`` /
``Story:``) and its contract: the story uses the listed words, has dialogue when Features
says Dialogue, a sad ending for BadEnding, a surprise for Twist, an early hint for
Foreshadowing and a lesson for MoralValue, and the summary tells what happens. Each story
draws a hero, a friend, a place, a toy and one of six problems, then fills that problem's
sentences; a few hundred distinct words in fixed patterns are what a tiny model can learn
in minutes on a CPU. It is synthetic: nothing here was written by a person or a model
other than these templates.
"""

from __future__ import annotations

import random
import re

from .instruct import instruct_text

_SENTENCE_END = re.compile(r"(?<=[.!?]) ")
FEATURES = ("Dialogue", "BadEnding", "Twist", "Foreshadowing", "MoralValue")

NAMES = {
    "she": ["Lily", "Mia", "Anna", "Lucy", "Sara", "Emma", "Zoe", "Amy", "Kate", "Ella",
            "Rosie", "Daisy", "Molly", "Ruby"],
    "he": ["Tom", "Ben", "Sam", "Max", "Tim", "Jack", "Leo", "Finn", "Bob", "Joe", "Toby",
           "Ollie", "Jake", "Timmy"],
}
PEOPLE = {"she": "girl", "he": "boy"}
ANIMALS = ["cat", "dog", "bunny", "bear", "duck", "fox", "bird", "frog", "mouse", "puppy",
           "kitten", "owl", "lion", "pig"]
CRITTERS = ["squirrel", "puppy", "bunny", "fox", "kitten", "monkey", "goat"]  # twist helpers
COLORS = ["red", "blue", "yellow", "green", "pink", "orange", "purple", "shiny", "new",
          "little"]
TOYS = {  # toy -> what you do with it ("kick the ball")
    "ball": "kick", "kite": "fly", "boat": "sail", "drum": "play", "teddy bear": "hug",
    "toy car": "push", "book": "read", "doll": "dress", "truck": "push", "hat": "wear",
    "frisbee": "throw", "balloon": "hold",
}
PLACES = {  # place -> what it was like
    "park": "full of children", "garden": "full of flowers", "forest": "quiet and green",
    "beach": "warm and sunny", "farm": "full of animals", "pond": "calm and blue",
    "hill": "high and windy", "meadow": "full of butterflies", "lake": "big and shiny",
    "playground": "busy and loud",
}
WATER_PLACES = ["pond", "beach", "lake"]  # where a toy can fall into the water
FEELINGS = {"good": ["happy", "proud", "glad", "excited"],
            "bad": ["sad", "upset", "sorry", "lonely"]}

OPENINGS = (
    "Once upon a time, there was {a_kind} named {name}.",
    "Once upon a time, in a small town, there lived {a_kind} called {name}.",
    "There was once {a_kind} named {name} who liked to laugh.",
    "One sunny morning, {a_kind} named {name} woke up early.",
)
HAVING = (
    "{He} had {a_color} {toy}, and {he} loved to {verb} it every day.",
    "{His} favorite toy was {a_color} {toy}. {He} liked to {verb} it all day long.",
    "{He} loved {his} {color} {toy} more than anything. {He} would {verb} it all day.",
)
OUTINGS = (
    "One day, {name} went to the {place} with {his} friend {friend}, {a_fkind}.",
    "One day, {name} and {his} friend {friend}, {a_fkind}, went to play at the {place}.",
    "On a bright day, {name} took {his} {toy} to the {place}. {His} friend {friend}, "
    "{a_fkind}, came too.",
)
SETTINGS = ("The {place} was {scene}.", "The {place} was {scene} that day.")
PLAYING = (
    "They took turns to {verb} the {toy} and laughed a lot.",
    "They played with the {toy} and ran in the sun. It was fun to {verb} it together.",
)
GOOD_CLOSE = (
    "They played together until it was time to go home. {name} felt very {feeling}.",
    "From that day on, {name} and {friend} were best friends, and {name} felt {feeling}.",
    "{name} and {friend} went home tired and {feeling}.",
)
THANKS = "{name} gave {friend} a big hug."
THANKS_D = '"Thank you, {friend}!" said {name}. "You are a good friend."'
BAD_CLOSE = (
    "{name} did not smile for the rest of the day. {He} felt very {feeling}.",
    "That night, {name} was {feeling} and could not sleep.",
)

# One dict per problem. Keys ending in _d are the Dialogue versions of the line before.
PROBLEMS: dict[str, dict[str, str]] = {
    "lost": {
        "hint": "In the bushes, a little {critter} was watching them.",
        "trouble": "{name} put the {toy} down to look at a butterfly. When {he} turned "
                   "around, the {toy} was gone!",
        "cry": "{name} was very sad and started to cry.",
        "cry_d": '"Oh no! Where is my {toy}?" cried {name}.',
        "help": "{friend} said {fhe} would help {him} look.",
        "help_d": '"Don\'t be sad," said {friend}. "I will help you find it."',
        "good": "They looked under the bushes and behind the trees. At last, {friend} "
                "found the {toy} in the tall grass.",
        "twist_good": "Then something surprising happened. A little {critter} came out of "
                      "the bushes with the {toy}! It only wanted to play, and it gave the "
                      "{toy} back.",
        "bad": "They looked and looked until the sun went down, but the {toy} was nowhere "
               "to be found.",
        "twist_bad": "At last they saw the {toy} in the grass. But before {name} could get "
                     "it, a little {critter} grabbed it and ran far into the woods.",
        "regret_d": '"I should have kept my {toy} close," said {name} in a small voice.',
        "moral_good": "{name} learned that good friends help each other.",
        "moral_bad": "{name} learned to always take good care of {his} things.",
        "summary_good": "{name} loses {his} {toy} at the {place}, and {friend} helps {him} "
                        "find it.",
        "summary_twist_good": "{name} loses {his} {toy} at the {place}, and a playful "
                              "{critter} brings it back.",
        "summary_bad": "{name} loses {his} {toy} at the {place} and never finds it.",
        "summary_twist_bad": "{name} loses {his} {toy} at the {place}, and a {critter} "
                             "runs away with it.",
    },
    "tree": {
        "hint": "Next to them stood a very tall tree with long branches.",
        "trouble": "{name} threw the {toy} high up in the air, and it got stuck in a tall "
                   "tree!",
        "cry": "{name} could not reach it, and {he} felt upset.",
        "cry_d": '"My {toy} is stuck! I can\'t reach it," said {name}.',
        "help": "{friend} thought hard and had an idea.",
        "help_d": '"Let\'s get a long stick," said {friend}. "We can do it together."',
        "good": "{friend} found a long stick. They pushed and poked until the {toy} fell "
                "down into the soft grass.",
        "twist_good": "Just then, a big bird landed on the branch. It pushed the {toy} with "
                      "its wings, and the {toy} fell right into {name}'s arms!",
        "bad": "They tried and tried, but the tree was too tall. The {toy} stayed up in the "
               "tree.",
        "twist_bad": "Then a strong wind came. It did not bring the {toy} down. It blew the "
                     "{toy} over the tree and far away.",
        "regret_d": '"Goodbye, {toy}," said {name} sadly.',
        "moral_good": "{name} learned that two friends can do more than one.",
        "moral_bad": "{name} learned not to throw {his} things so high.",
        "summary_good": "{name}'s {toy} gets stuck in a tree, and {friend} helps {him} get "
                        "it down with a stick.",
        "summary_twist_good": "{name}'s {toy} gets stuck in a tree, and a bird knocks it "
                              "down.",
        "summary_bad": "{name}'s {toy} gets stuck in a tall tree, and they cannot get it "
                       "back.",
        "summary_twist_bad": "{name}'s {toy} gets stuck in a tree, and the wind blows it "
                             "away.",
    },
    "share": {
        "hint": "{friend} looked at the {toy} and wanted to play with it too.",
        "trouble": "{friend} asked to play with the {toy}, but {name} said no. They both "
                   "pulled, and the {toy} broke!",
        "cry": "{name} and {friend} were both angry.",
        "cry_d": '"It is mine!" shouted {name}. "You broke it!" shouted {friend}.',
        "help": "Then they stopped and looked at each other, and they both felt bad.",
        "help_d": '"I am sorry," said {name}. "I am sorry too," said {friend}.',
        "good": "{name}'s mom came and helped them fix the {toy} with some glue. Then they "
                "took turns to {verb} it.",
        "twist_good": "But when they looked closer, the {toy} was not broken at all! Only a "
                      "small piece had come off, and it clicked right back on.",
        "bad": "The {toy} could not be fixed. {name} and {friend} did not play together "
               "that day.",
        "twist_bad": "Mom tried to fix the {toy}, but then it broke again into even more "
                     "pieces.",
        "regret_d": '"I wish I had shared," said {name}.',
        "moral_good": "{name} learned that sharing is better than fighting.",
        "moral_bad": "{name} learned that it is better to share than to fight.",
        "summary_good": "{name} does not want to share {his} {toy}, it breaks, and the "
                        "friends fix it and take turns.",
        "summary_twist_good": "{name} and {friend} fight over a {toy} that seems broken, "
                              "but it is not.",
        "summary_bad": "{name} and {friend} fight over a {toy} until it breaks for good.",
        "summary_twist_bad": "{name} and {friend} break a {toy} in a fight, and it breaks "
                             "again when Mom tries to fix it.",
    },
    "rain": {
        "hint": "Far away, some dark clouds were coming closer.",
        "trouble": "Suddenly, the sky turned gray, and big drops of rain began to fall.",
        "cry": "{name} was scared of the loud thunder.",
        "cry_d": '"I don\'t like the rain!" said {name}. "My {toy} will get wet."',
        "help": "{friend} took {his} hand and said they should find a dry place.",
        "help_d": '"Come with me," said {friend}. "We can hide under the big tree."',
        "good": "They hid under a big tree until the rain stopped. Soon the sun came out "
                "again, and the {toy} was still dry.",
        "twist_good": "When the rain stopped, they saw a big rainbow over the {place}, and "
                      "the puddles were perfect for jumping!",
        "bad": "The rain did not stop. The {toy} got wet and dirty, and {name} went home "
               "cold.",
        "twist_bad": "The rain stopped, and they ran back out. But a big puddle was "
                     "waiting, and the {toy} fell right in the mud.",
        "regret_d": '"This is the worst day ever," said {name}.',
        "moral_good": "{name} learned that a bad day can turn into a good day.",
        "moral_bad": "{name} learned to look at the sky before going out to play.",
        "summary_good": "{name} and {friend} hide from the rain at the {place}, and the "
                        "sun comes back.",
        "summary_twist_good": "{name} and {friend} are caught in the rain, and a rainbow "
                              "appears.",
        "summary_bad": "The rain spoils {name}'s day at the {place}.",
        "summary_twist_bad": "After the rain, {name}'s {toy} falls into a muddy puddle.",
    },
    "astray": {
        "hint": "Behind the {place} was a long path that {name} had never seen.",
        "trouble": "{name} walked away to find a new place to {verb} the {toy}. Soon {he} "
                   "did not know where {he} was.",
        "cry": "{name} felt scared and alone.",
        "cry_d": '"{friend}, where are you?" called {name}. "I am lost!"',
        "help": "{friend} heard a sound and started to look for {him}.",
        "help_d": '"I can hear you, {name}!" called {friend}. "Stay there, I am coming!"',
        "good": "{friend} followed the sound and found {name} by a big rock. They walked "
                "back together, hand in hand.",
        "twist_good": "Then a friendly {critter} came along. It led {name} all the way back "
                      "to {friend}!",
        "bad": "{name} walked the wrong way, and it got dark. It was a long time before "
               "{his} mom found {him}.",
        "twist_bad": "{name} saw {friend} far away and ran fast, but {he} fell and hurt "
                     "{his} knee, and the {toy} rolled away.",
        "regret_d": '"I should not have walked away," said {name} with tears in {his} eyes.',
        "moral_good": "{name} learned to always stay close to {his} friends.",
        "moral_bad": "{name} learned never to walk away alone.",
        "summary_good": "{name} gets lost near the {place}, and {friend} finds {him}.",
        "summary_twist_good": "{name} gets lost, and a friendly {critter} shows {him} the "
                              "way back.",
        "summary_bad": "{name} gets lost near the {place} and is not found until dark.",
        "summary_twist_bad": "{name} gets lost, hurts {his} knee and loses {his} {toy}.",
    },
    "water": {
        "hint": "Near them, the water was moving fast.",
        "trouble": "{name} played too close to the water, and the {toy} fell in! It began "
                   "to float away.",
        "cry": "{name} did not know what to do.",
        "cry_d": '"Help! My {toy} is in the water!" cried {name}.',
        "help": "{friend} ran to find something long.",
        "help_d": '"Wait, I have an idea!" said {friend}.',
        "good": "{friend} found a long stick and pulled the {toy} back to the shore. It "
                "was wet, but it was safe.",
        "twist_good": "Then a kind duck swam over and pushed the {toy} back to the shore "
                      "with its beak!",
        "bad": "The water took the {toy} far away, and they could not get it back.",
        "twist_bad": "A big fish jumped up, and with a splash, the {toy} sank to the "
                     "bottom.",
        "regret_d": '"I should not have played so close to the water," said {name}.',
        "moral_good": "{name} learned to be careful near the water.",
        "moral_bad": "{name} learned that water can be dangerous.",
        "summary_good": "{name}'s {toy} falls into the water, and {friend} gets it back "
                        "with a stick.",
        "summary_twist_good": "{name}'s {toy} falls into the water, and a duck brings it "
                              "back.",
        "summary_bad": "{name}'s {toy} falls into the water and floats away.",
        "summary_twist_bad": "{name}'s {toy} falls into the water and sinks.",
    },
}


def demo_stories(n: int, seed: int) -> list[str]:
    """``n`` records in TinyStoriesInstruct layout, without ``<|endoftext|>``.

    Story ``i`` depends only on ``(seed, i)``, so a shorter list is a prefix of a longer
    one and the corpus is the same on every machine and Python version.
    """
    return [_record(random.Random(f"deepseek-mini-demo-{seed}-{i}")) for i in range(n)]


def format_record(features: list[str], words: list[str], summary: str, story: str = "",
                  random_sentence: str | None = None) -> str:
    """A record in the TinyStoriesInstruct layout; with ``story=""`` it is the prompt a
    model continues after ``Story:``."""
    return instruct_text(", ".join(features), ", ".join(words), summary, random_sentence or None,
                         story)


def _record(rng: random.Random) -> str:
    features = [f for f in FEATURES if rng.random() < 0.35] or [rng.choice(FEATURES)]
    trouble = rng.choice(list(PROBLEMS))
    slots = _cast(rng, WATER_PLACES if trouble == "water" else list(PLACES))
    problem = PROBLEMS[trouble]
    paragraphs, feeling = _story(rng, problem, set(features), slots)
    text = "\n".join(paragraphs)
    ending = ("twist_" if "Twist" in features else "") + (
        "bad" if "BadEnding" in features else "good")
    summary = problem[f"summary_{ending}"].format(**slots)
    words = [slots["verb"], slots["toy"].split()[-1], feeling]
    rng.shuffle(words)
    sentences = [s for p in paragraphs for s in _SENTENCE_END.split(p) if '"' not in s]
    random_sentence = rng.choice(sentences) if rng.random() < 0.3 else None
    return format_record(features, words, summary, text, random_sentence)


def _cast(rng: random.Random, places: list[str]) -> dict[str, str]:
    """Who, where and with what: the slots every template may use."""
    he, fhe = rng.choice(list(NAMES)), rng.choice(list(NAMES))
    name = rng.choice(NAMES[he])
    friend = rng.choice([n for n in NAMES[fhe] if n != name])
    kind = PEOPLE[he] if rng.random() < 0.5 else rng.choice(ANIMALS)
    fkind = PEOPLE[fhe] if rng.random() < 0.5 else rng.choice(ANIMALS)
    toy, color, place = rng.choice(list(TOYS)), rng.choice(COLORS), rng.choice(places)
    his, him = ("her", "her") if he == "she" else ("his", "him")
    return {
        "name": name, "he": he, "He": he.capitalize(), "his": his, "His": his.capitalize(),
        "him": him, "friend": friend, "fhe": fhe, "kind": kind,
        "a_kind": _a(f"little {kind}" if rng.random() < 0.6 else kind),
        "a_fkind": _a(fkind), "toy": toy, "verb": TOYS[toy], "color": color,
        "a_color": _a(color), "place": place, "scene": PLACES[place],
        "critter": rng.choice(CRITTERS),
    }


def _story(rng: random.Random, problem: dict[str, str], features: set[str],
           slots: dict[str, str]) -> tuple[list[str], str]:
    """Three paragraphs (beginning, problem, ending) and the feeling word it names."""
    talk = "_d" if "Dialogue" in features else ""
    bad = "BadEnding" in features
    feeling = rng.choice(FEELINGS["bad" if bad else "good"])
    s = {**slots, "feeling": feeling}
    beginning = [rng.choice(OPENINGS), rng.choice(HAVING), rng.choice(OUTINGS),
                 rng.choice(SETTINGS), rng.choice(PLAYING)]
    if "Foreshadowing" in features:
        beginning.append(problem["hint"])
    middle = [problem["trouble"], problem["cry" + talk], problem["help" + talk]]
    ending = [problem[("twist_" if "Twist" in features else "") + ("bad" if bad else "good")]]
    if bad:
        ending += [problem["regret_d"] if talk else "", rng.choice(BAD_CLOSE)]
    else:
        ending += [THANKS_D if talk else THANKS, rng.choice(GOOD_CLOSE)]
    if "MoralValue" in features:
        ending.append(problem["moral_bad" if bad else "moral_good"])
    paragraphs = [" ".join(t.format(**s) for t in part if t)
                  for part in (beginning, middle, ending)]
    return paragraphs, feeling


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase
