"""A small hand-made part-of-speech word list for children's stories, and the irregular
forms its inflection rules cannot make.

Derived ``Words:`` lines name one verb, one noun and one adjective of the story, as
TinyStoriesInstruct's do; no tagger ships with the package (nltk's tagger data needs a
download), so the part of speech comes from these lists. Each word is in one list only:
words that are verbs and nouns alike (play, hug, smile, rain) are listed as verbs, and
very common light verbs (be, have, do, get, go, say, ...) are left out so that a line
asks for something worth asking. A story whose words are in none of a list gets no
``Words:`` line rather than a guess.
"""

from __future__ import annotations


def _listed(text: str) -> frozenset[str]:
    return frozenset(text.split())


VERBS = _listed("""
act add admire agree allow answer appear argue arrive ask bake bark bathe beg begin
believe bite blink blow boil borrow bounce bow break breathe bring brush build bump burn
buy call calm camp care carry catch celebrate chase cheer chew choose clap clean climb
close collect comb complain cook count cover crawl cross cry cuddle cut dance dare decide
decorate deliver dig dive draw dream dress drink drive drop dry eat enjoy escape explore
fall feed fetch fight fill find finish fit fix float flow fly fold follow forget forgive
freeze frown gather giggle give glow grab greet grin grow growl guess hang happen hate
hear help hide hit hold hop hope hug hum hunt hurry hurt imagine invite jog join joke
jump kick kiss kneel knock laugh learn leave lick lift listen live lose love melt mix
move nap nod notice obey offer open pack paint pass pat peek pick pinch plant play point
poke pour pray pretend promise protect pull push race rain reach read relax remember
repair rescue rest return ride ring rip roar roll rub rush sail save scream search share
shake shine shiver shop shout show sing sink sip sit skip sleep slide slip smell smile
sneeze sniff snore solve sort spill splash spin spray spread squeeze stare start stay
steal stir stop stretch study surprise swim swing taste teach tear thank throw tickle
tie touch trade travel trip trust try turn twist understand unlock visit wait wake walk
wander warn wash watch wave wear whisper whistle win wink wish wonder work worry wrap
write yell run stand sew sweep keep meet send sell bend lend wiggle bloom buzz chirp
hatch howl knit mop pop quack scratch sneak squeak swap
""")

NOUNS = _listed("""
animal ant apple arm baby backyard bag ball balloon banana band basket bath beach bead
bean bear bed bee bell belt bench berry bike bird birthday blanket block boat body bone
book boot bottle bowl box boy branch bread breakfast brick bridge brother bubble bucket
bug bunny bus bush butter butterfly button cake candle candy cap car card carrot castle
cat chair cheese cherry chicken child city class clock cloud clown coat cookie corn cow
crab crayon crown cup cupcake dad daisy desk dinner dinosaur dog doll dolphin door dragon
dress drum duck eagle ear egg elephant eye face fairy family farm farmer feather fence
field finger fire fish flag flower fly food foot forest fork fox friend frog fruit game
garden gate ghost gift giraffe girl glass glove goat grandma grandpa grass hair hammer
hand hat head heart hill hole home honey horse house ice jar jelly juice jungle key king
kitchen kite kitten knee ladder lady lake lamb lamp leaf leg lemon letter lion lunch
map meadow milk mirror mom money monkey monster moon mountain mouse mouth mud nest net
night nose ocean orange owl paper park party path pear pen pencil penguin pet piano
picture pie pig pillow plane plate pond pony pot present prince princess pumpkin puppy
puzzle queen rabbit rainbow river road robot rock rocket roof room rope rose sand
sandwich school sea seed shark sheep shell ship shirt shoe shop shore sister sky slide
snake snow soap sock sofa soup spider spoon squirrel star stick stone store storm story
street sun sunflower swan table tail teacher teddy tent tiger toast toe tooth towel tower
town toy train tree truck turtle umbrella van vase wagon wall water wheel whale window
wing wolf woods worm zoo
""") - VERBS

ADJECTIVES = _listed("""
afraid angry bad beautiful big bitter blue bold bored brave bright broken brown busy calm
careful cheerful clean clever cold colorful cool cozy crazy creepy cute curious dark
dear deep delicious different dirty dizzy dry dull eager early easy empty excited fair
famous fancy fast fat fierce fine fluffy foolish free fresh friendly full funny fuzzy
gentle giant glad gloomy golden good grateful gray great greedy green grumpy happy hard
healthy heavy helpful high honest hot huge hungry icy important jolly kind large lazy
light little lonely long loud lovely lucky mad magic messy mighty modest muddy naughty
neat nervous new nice noisy old orange pink plain polite poor pretty proud purple quick
quiet rare red rich rough round rude sad safe scary selfish shiny short shy silly simple
sleepy slow small smart smooth soft sore sour special spicy sticky strange strong sunny
sweet tall tasty tender thick thin thirsty tidy tiny tired ugly upset warm weak wet wide
wild wise wonderful yellow young yummy
""") - VERBS - NOUNS

# base -> forms the suffix rules cannot make (past, participle, plural, comparative)
IRREGULAR: dict[str, tuple[str, ...]] = {
    "begin": ("began", "begun"), "bite": ("bit", "bitten"), "blow": ("blew", "blown"),
    "break": ("broke", "broken"), "bring": ("brought",), "build": ("built",),
    "buy": ("bought",), "catch": ("caught",), "choose": ("chose", "chosen"),
    "dig": ("dug",), "draw": ("drew", "drawn"), "dream": ("dreamt",),
    "drink": ("drank", "drunk"), "drive": ("drove", "driven"), "eat": ("ate", "eaten"),
    "fall": ("fell", "fallen"), "feed": ("fed",), "fight": ("fought",), "find": ("found",),
    "fly": ("flew", "flown"), "forget": ("forgot", "forgotten"),
    "forgive": ("forgave", "forgiven"), "freeze": ("froze", "frozen"),
    "give": ("gave", "given"), "grow": ("grew", "grown"), "hang": ("hung",),
    "hear": ("heard",), "hide": ("hid", "hidden"), "hold": ("held",),
    "kneel": ("knelt",), "leave": ("left",), "lose": ("lost",), "read": ("read",),
    "ride": ("rode", "ridden"), "ring": ("rang", "rung"), "run": ("ran",),
    "shake": ("shook", "shaken"), "shine": ("shone",), "sing": ("sang", "sung"),
    "sink": ("sank", "sunk"), "sit": ("sat",), "sleep": ("slept",), "slide": ("slid",),
    "smell": ("smelt",), "spin": ("spun",), "spread": ("spread",), "steal": ("stole", "stolen"),
    "swim": ("swam", "swum"), "swing": ("swung",), "teach": ("taught",),
    "tear": ("tore", "torn"), "throw": ("threw", "thrown"),
    "understand": ("understood",), "wake": ("woke", "woken"), "wear": ("wore", "worn"),
    "win": ("won",), "write": ("wrote", "written"), "cut": ("cut",), "hit": ("hit",),
    "hurt": ("hurt",), "stand": ("stood",), "sew": ("sewn",), "sweep": ("swept",),
    "keep": ("kept",), "meet": ("met",), "send": ("sent",), "sell": ("sold",),
    "bend": ("bent",), "lend": ("lent",),
    "child": ("children",), "foot": ("feet",), "tooth": ("teeth",), "mouse": ("mice",),
    "leaf": ("leaves",), "wolf": ("wolves",), "shelf": ("shelves",), "knife": ("knives",),
    "sheep": ("sheep",), "fish": ("fish",), "goose": ("geese",), "man": ("men",),
    "woman": ("women",),
    "good": ("better", "best"), "bad": ("worse", "worst"), "far": ("farther", "further"),
}
