"""Make the embedded offline defaults in `assets/`: a tiny story corpus and a tiny Llama.

Every step of the tutorial must run on a laptop with no access to the Hugging Face hub,
so `--dataset_name` and `--model_name` default to two small local directories that this
script builds from scratch, deterministically:

  assets/tiny_stories/train.jsonl.gz  ~4 MB of simple children's stories, one
                                      {"text": ...} record per line, written by the story
                                      generator below (plot templates + word lists +
                                      random.Random(SEED)); no text is copied from
                                      anywhere. `datasets.load_dataset(path)` reads it as
                                      one "train" split with a "text" column.
  assets/tiny_llama/config.json       a 4-layer, 256-wide Llama config, written by hand
                                      so that it does not embed a library version.
  assets/tiny_llama/tokenizer*.json   a byte-level BPE tokenizer with 4096 tokens
                                      (<unk>=0, <s>=1, </s>=2), trained on the corpus.
  assets/tiny_mixtral/                step 15's mixture of experts: the tiny Llama with
                                      8 experts (2 per token) in every layer's MLP, and
                                      the same tokenizer.

Usage (from anywhere):
  python tools/make_assets.py            regenerate assets/ in place
  python tools/make_assets.py --check    regenerate into a temp dir; fail, naming the
                                         file, if assets/ differs from it
  python tools/make_assets.py --out DIR  write DIR/tiny_stories, DIR/tiny_llama and DIR/tiny_mixtral
                                         (with --check: check DIR instead of assets/)

Determinism: the stories come from one seeded `random.Random` walking fixed lists; the
gzip stream has no file name and no timestamp; the tokenizer trainer sees the stories in
a fixed order on one thread. `--check` compares the *decompressed* corpus (zlib builds
may compress the same bytes differently) and every other file byte for byte. The JSON
layout of tokenizer.json belongs to the `tokenizers` release that writes it, so after a
`tokenizers` upgrade `--check` may fail with nothing else changed: regenerate and commit.
"""

import os

# Train the tokenizer serially, so its result cannot depend on thread scheduling or on
# the number of cores. Set before `tokenizers` is imported.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"

import argparse
import gzip
import json
import random
import sys
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
CORPUS_DIR, MODEL_DIR, MOE_MODEL_DIR = "tiny_stories", "tiny_llama", "tiny_mixtral"
CORPUS_FILE = "train.jsonl.gz"
SEED = 1234
NUM_STORIES = 4700

VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2, as in Llama 2 / TinyLlama

MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "hidden_act": "silu",
    "hidden_size": 256,
    "initializer_range": 0.02,
    "intermediate_size": 768,
    "max_position_embeddings": 1024,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 8,
    "num_hidden_layers": 4,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "vocab_size": VOCAB_SIZE,
}

# Step 15's mixture of experts: the same model with every MLP a sparse MoE block of 8 experts, 2 per token, each
# expert a third as wide as the dense MLP (so a token's expert compute is 2/3 of the dense MLP's).
MOE_CONFIG = dict(
    {key: value for key, value in MODEL_CONFIG.items() if key not in ("attention_bias", "mlp_bias")},
    architectures=["MixtralForCausalLM"], model_type="mixtral", intermediate_size=256, num_local_experts=8,
    num_experts_per_tok=2, router_aux_loss_coef=0.02, router_jitter_noise=0.0, sliding_window=None)

TOKENIZER_CONFIG = {
    "add_bos_token": False,  # the dataloader appends eos itself; encode adds nothing
    "add_eos_token": False,
    "bos_token": "<s>",
    "clean_up_tokenization_spaces": False,  # keep decode(encode(text)) == text
    "eos_token": "</s>",
    "model_max_length": MODEL_CONFIG["max_position_embeddings"],
    "tokenizer_class": "PreTrainedTokenizerFast",
    "unk_token": "<unk>",
}

CORPUS_README = """\
---
language: en
configs:
- config_name: default
  data_files:
  - split: train
    path: train.jsonl.gz
---

# tiny_stories

About 4 MB of simple English children's stories, made up from templates and word lists by
`tools/make_assets.py` (seeded, deterministic; no text copied from anywhere). It stands in
for `roneneldan/TinyStories` so the tutorial runs offline:
`datasets.load_dataset("assets/tiny_stories")` gives one `train` split with a `text` column.
Regenerate with `python tools/make_assets.py`; `--check` verifies the committed copy.
"""

# ---------------------------------------------------------------------------------
# Word lists
# ---------------------------------------------------------------------------------

GIRLS = """Lily Mia Anna Lucy Sue Emma Zoe Ella Ava Rose Amy Kate Sara Nora Ruby Maya Lena
Ivy Chloe Grace Hannah Julia Molly Daisy Olive Poppy Hazel Stella Luna Iris Alice Clara
Elsie Fiona Gemma Holly Jenny Kira Lola Mary Nina Paula Rita Tara Vera Wendy Amara Priya
Mei Aisha Sofia Leila Yuki Nadia Bella Jade Penny Tess Abby Dora Greta Freya Mila Esme
Naomi Ines Lottie Matilda Willow Pearl Beatrice Camila Delia Edith Flora Harriet Imani
Josie Keiko Lucia Marisol Nell Ophelia Rosalind Selma Talia Ursula Violet Winnie Yasmin
Zara Adele Bonnie Cora Dinah Elena Frida Gloria Hattie Isla June Kiki Lara Maisie
Noelle Orla Phoebe Queenie Rhea Sadie Thea Una Vivi Xena""".split()

BOYS = """Tom Ben Max Sam Tim Jack Leo Finn Joe Bob Dan Eli Noah Luke Owen Ryan Adam Carl
Dave Evan Felix Gus Henry Ian Jake Kai Liam Milo Nick Oscar Paul Quinn Rex Seth Theo
Umar Victor Will Zack Arlo Billy Caleb Dev Ezra Hugo Jonah Kofi Lars Mateo Omar Pete
Ravi Sami Toby Ollie Jasper Ned Ari Rafi Otto Bruno Cody Frank Hector Louis Marco Tariq
Wally Yusuf Emil Abel Boris Cyrus Dexter Elliot Fergus Gideon Harvey Isaac Jonas Kenji
Lionel Magnus Nico Orson Percy Rufus Silas Tobias Ulric Vince Walter Xavier Yosef Zane
Alfie Barney Cedric Dominic Edgar Frankie Grover Hamish Ivan Jules Kit Laszlo Monty
Nate Ozzie Pablo Reggie Stanley Teddy""".split()

SURNAMES = """Brown Green Plum Fig Berry Hill Wood Stone Baker Miller Fisher Potter Cooper
Taylor Walker Bell Rivers Snow Lark Moss Reed Parker Hart Wren Finch Gray Honey Maple
Pepper Button Thimble Puddle Bramble Clay Marsh Frost Sparrow Bloom Field Brook Lane
Meadows Birch Oakley Pebble Tumble Waddle Kettle Crumb Pickett Whistle Dewberry
Hopkins Fairweather Goodwin Lightfoot Merryweather Nightingale""".split()

PET_NAMES = """Pip Rusty Bubbles Whiskers Sunny Coco Biscuit Pepper Ziggy Patch Socks Nutmeg
Button Mango Peanut Tofu Fluffy Snowball Shadow Ginger Bingo Muffin Noodle Pickles
Waffles Twinkle Clover Hopper Squeak Flicker Dot Bramble Marble Puddle Sprout Jellybean
Toffee Pumpkin Acorn Zippy Fuzzy Blossom Pebbles Cricket Dusty Honeybee Sparky Tumbles
Wiggles Dumpling Hazelnut Paws Buttercup Scooter Tinker Boots Barnaby Kipper Fidget
Pudding Snickers Rascal Pancake Sprinkles Gizmo Bean Chester Mittens Nibbles""".split()

TOWN_STARTS = """Apple Willow Maple Oak River Stone Green Sunny Fox Rose Honey Clover Pine
Birch Cedar Elm Meadow Silver Golden Misty Hazel Cherry Bramble Thistle Amber Lark
Wren Bright Mossy Berry""".split()
TOWN_ENDS = """brook field wood vale ton ford hill dale bury haven port side moor glen
stead wick""".split()

# Animals a child can meet; the first group can also be the hero of a story.
HERO_ANIMALS = """bunny fox mouse squirrel puppy kitten duck frog bear owl hedgehog
turtle lamb piglet otter raccoon chick mole badger robin penguin koala kangaroo beaver
hamster donkey goat pony duckling cub""".split()
ANIMALS = HERO_ANIMALS + """dog cat bird cow horse sheep hen rooster deer lion tiger
elephant monkey giraffe zebra seal whale dolphin fish crab butterfly bee ladybug snail
worm wolf panda parrot swan goose crow bat lizard camel goldfish moose octopus
caterpillar dragonfly grasshopper firefly seagull pelican flamingo peacock hippo rhino
gorilla sloth chipmunk weasel ferret starfish jellyfish tortoise woodpecker hummingbird
bluebird sparrow magpie toad newt salamander alligator walrus polar-bear reindeer
llama ostrich""".replace("polar-bear", "polar_bear").split()
ANIMALS = [animal.replace("_", " ") for animal in ANIMALS]

ANIMAL_SOUNDS = {
    "dog": "Woof", "puppy": "Woof", "cat": "Meow", "kitten": "Mew", "duck": "Quack",
    "duckling": "Quack", "frog": "Ribbit", "toad": "Croak", "cow": "Moo", "sheep": "Baa",
    "lamb": "Baa", "owl": "Hoot", "hen": "Cluck", "chick": "Cheep", "bird": "Tweet",
    "robin": "Tweet", "bluebird": "Tweet", "sparrow": "Chirp", "piglet": "Oink",
    "horse": "Neigh", "pony": "Neigh", "goat": "Maa", "bee": "Buzz", "lion": "Roar",
    "tiger": "Roar", "cub": "Roar", "bear": "Grr", "mouse": "Squeak", "hamster": "Squeak",
    "goose": "Honk", "crow": "Caw", "donkey": "Hee-haw", "rooster": "Cock-a-doodle-doo",
    "wolf": "Awoo", "seagull": "Squawk", "parrot": "Squawk", "seal": "Arf",
}

FAMILY = [("Mom", "she"), ("Dad", "he"), ("Grandma", "she"), ("Grandpa", "he"),
          ("Nana", "she"), ("Papa", "he"), ("Granny", "she"), ("Grandad", "he")]

HELPERS = ["police officer", "shopkeeper", "bus driver", "librarian", "baker",
           "firefighter", "park ranger", "mail carrier", "nurse", "lady with a dog",
           "man selling balloons", "crossing guard"]

PLACES = [("the park", "at"), ("the garden", "in"), ("the forest", "in"),
          ("the beach", "at"), ("the farm", "on"), ("the lake", "by"), ("the big hill", "on"),
          ("the meadow", "in"), ("the school yard", "in"), ("the library", "at"),
          ("the zoo", "at"), ("the playground", "at"), ("the market", "at"),
          ("the river", "by"), ("the pond", "by"), ("the backyard", "in"),
          ("the woods", "in"), ("the orchard", "in"), ("the old barn", "in"),
          ("the seaside", "at"), ("the town square", "in"), ("the bakery", "at"),
          ("the toy shop", "at"), ("the castle", "at"), ("the cave", "in"),
          ("the little island", "on"), ("the mountain", "on"), ("the field", "in"),
          ("the jungle", "in"), ("the kitchen", "in"), ("the attic", "in"),
          ("the treehouse", "in"), ("the bridge", "on"), ("the harbor", "at"),
          ("the campsite", "at"), ("the museum", "at"), ("the swamp", "in"),
          ("the valley", "in"), ("the flower shop", "at"), ("the train station", "at"),
          ("the lighthouse", "at"), ("the windmill", "by"), ("the waterfall", "by"),
          ("the sunflower field", "in"), ("the duck pond", "by"), ("the old mill", "by"),
          ("the ice rink", "at"), ("the carnival", "at"), ("the greenhouse", "in"),
          ("the bus stop", "at"), ("the hospital", "at"), ("the fire station", "at"),
          ("the pumpkin patch", "in"), ("the sandbox", "in"), ("the vegetable garden", "in")]

TOYS = """ball kite teddy_bear doll toy_car toy_train drum boat hat scarf balloon book
puzzle robot jump_rope yo-yo whistle marble blanket bucket shovel bike wagon
spinning_top flute shell pebble feather ribbon necklace crown wand lantern umbrella
backpack map key box bell cup mitten rocket truck dinosaur airplane paintbrush
music_box sticker notebook tambourine harmonica magnifying_glass compass telescope
pinwheel rubber_duck sailboat bracelet hairclip sock_puppet rag_doll xylophone
skateboard scooter tricycle snow_globe kaleidoscope piggy_bank flashlight camera
watering_can fishing_net treasure_chest""".split()
TOYS = [toy.replace("_", " ") for toy in TOYS]

COLORS = """red blue green yellow purple orange pink brown white black gold silver gray
golden turquoise violet crimson lime navy""".split()
LOOKS = """big small tiny huge shiny soft fuzzy bumpy old new striped spotty sparkly round
fluffy wooden squeaky wobbly bright dusty lumpy smooth heavy funny""".split()

FOODS = """apple cookie cake pie sandwich carrot banana grape cherry pear muffin pancake
strawberry peach plum cupcake pretzel blueberry lemon tomato cracker waffle donut nut
bun raspberry watermelon cucumber biscuit dumpling noodle meatball taco lollipop
gingerbread_man cinnamon_roll pickle radish turnip potato pea olive coconut mango
kiwi apricot tangerine""".split()
FOODS = [food.replace("_", " ") for food in FOODS]

GOOD_FEELINGS = """happy glad proud excited cheerful calm brave thankful joyful delighted
cozy hopeful""".split()
BAD_FEELINGS = """sad scared worried lonely grumpy upset nervous angry tired jealous
frightened gloomy cross""".split()

HOBBIES = ["to paint", "to sing", "to dance", "to read books", "to climb trees",
           "to play with blocks", "to look at the stars", "to splash in puddles",
           "to build sand castles", "to collect shiny rocks", "to draw pictures",
           "to ride {his} bike", "to bake with {adult}", "to play hide and seek",
           "to watch the clouds", "to pick flowers", "to count birds", "to jump rope",
           "to make up songs", "to play in the mud", "to fly kites", "to plant seeds",
           "to tell jokes", "to build forts", "to play the drum", "to catch bugs",
           "to whistle", "to do cartwheels", "to feed the ducks", "to skip stones",
           "to knit scarves", "to play dress-up", "to look for four-leaf clovers"]

TRAITS = ["with a loud laugh", "who loved jokes", "who was always hungry",
          "with a gap in {fhis} teeth", "who knew every song", "who could run very fast",
          "with freckles on {fhis} nose", "who never stopped talking",
          "who was good at finding things", "with a big floppy hat"]

FEARS = ["the dark", "thunder", "the big slide", "deep water", "the tall ladder",
         "the loud vacuum", "bees", "the creaky stairs", "big waves", "the high swing",
         "the old well", "the shadow behind the door", "the barking dog next door",
         "the doctor", "loud fireworks", "the basement"]

HOMES = ["little house", "small cottage", "blue house", "yellow house", "house on a hill",
         "cozy hut", "farmhouse", "big old house", "tiny apartment", "red cottage",
         "white house with a green door", "houseboat", "cabin by the trees"]

HIDING_SPOTS = ["under a bush", "behind a big rock", "inside a hollow log",
                "under a pile of leaves", "next to the fence", "in the tall grass",
                "under the bench", "behind the tree", "beside the stream",
                "in a muddy puddle", "under the slide", "on a high branch",
                "behind the shed", "inside an old boot", "between two flower pots",
                "under the porch", "in the sandpit", "beside the mailbox"]

INSTRUMENTS = ["drum", "piano", "violin", "flute", "guitar", "trumpet", "tambourine",
               "xylophone", "harp", "ukulele", "cello", "recorder"]
PET_KINDS = ["cat", "dog", "puppy", "kitten", "bunny", "hamster", "turtle", "goldfish",
             "parrot", "guinea pig", "lizard"]
PLANTS = ["a sunflower", "an apple tree", "a pumpkin", "a tall bean plant",
          "a rose bush", "a tomato plant", "a daisy", "a strawberry plant",
          "a tulip", "a lemon tree", "a big round melon", "a row of carrots"]
MAGIC_THINGS = ["stone", "shell", "feather", "coin", "star", "key", "bell", "ring",
                "acorn", "button", "marble", "leaf"]
GAMES = ["tag", "hide and seek", "catch", "ball", "pretend pirates", "jump rope",
         "hopscotch", "follow the leader", "duck duck goose", "red light green light"]
ACTIVITIES = ["built a fort out of sticks", "played tag", "drew pictures in the sand",
              "made a tower of blocks", "chased butterflies", "looked for shells",
              "sang silly songs", "rolled down the hill", "splashed in the water",
              "told each other stories", "made mud pies", "fed the ducks",
              "made paper boats", "built a snowman", "flew a kite", "had a tea party"]
HAIR = ["curly", "straight", "red", "brown", "black", "yellow", "short", "long",
        "messy", "wavy"]
NUMBER_WORDS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

# Weather: its season and lines describing it.
WEATHER = {
    "sunny": ("summer", ["The sun was shining and the sky was blue.",
                         "It was a warm and sunny day.",
                         "The sun felt warm on {his} face.",
                         "Bright sunlight danced on the grass."]),
    "rainy": ("spring", ["Rain tapped softly on the windows.",
                         "Big drops of rain fell from the gray sky.",
                         "The ground was wet and full of puddles.",
                         "It rained and rained all morning."]),
    "windy": ("autumn", ["The wind blew the leaves in circles.",
                         "A strong wind made the trees sway.",
                         "The wind whistled past the windows.",
                         "Orange and brown leaves flew through the air."]),
    "snowy": ("winter", ["Soft white snow covered the ground.",
                         "Snowflakes drifted down from the sky.",
                         "Everything outside was white and quiet.",
                         "The snow crunched under {his} boots."]),
    "cloudy": ("spring", ["Fluffy clouds hid the sun.",
                          "The sky was gray and still.",
                          "Big white clouds floated by like sheep.",
                          "It was a quiet, cloudy day."]),
    "foggy": ("autumn", ["A thick fog hung over everything.",
                         "The fog was so thick that {he} could hardly see the trees.",
                         "Everything looked soft and gray in the fog."]),
    "chilly": ("winter", ["The air was cold and crisp.",
                          "{He} could see {his} breath in the cold air.",
                          "Frost made the windows sparkle."]),
    "stormy": ("summer", ["Thunder rumbled far away.",
                          "Dark clouds rolled across the sky.",
                          "Lightning flashed, and the rain came down hard."]),
}

# ---------------------------------------------------------------------------------
# Story parts. A beat is a list of alternatives; each story picks one per beat.
# {Key} is {key} with a capital first letter. Characters: hero (he/him/his/himself),
# friend (fhe/fhim/fhis/fhimself), adult (ahe/ahim/ahis).
# ---------------------------------------------------------------------------------

OPENINGS = ["Once upon a time", "One day", "One {weather} morning", "One {weather} afternoon",
            "Long ago", "One {season} day", "Last {season}", "One {weather} evening",
            "Early one morning", "A long time ago", "Not long ago", "On a {weather} day",
            "One {day} morning", "Last {day}", "On a {weather} {day}"]

INTROS = [
    "{Opening}, there was {a_hero_kind} named {hero}.",
    "{Opening}, {a_hero_kind} named {hero} lived in a {home} near {place}.",
    "{Opening}, {hero} jumped out of bed and looked out the window.",
    "In a {home} in the town of {town}, there lived {a_hero_kind} called {hero}.",
    "{Opening}, {hero} the {hero_kind} went outside to play.",
    "{hero} was {a_hero_kind} who lived with {adult} in a {home} in {town}.",
    "{Opening}, in the little village of {town}, {a_hero_kind} named {hero} was bored.",
]

DETAILS = [
    "{He} had {hair} hair and {a_color} coat.",
    "{His} favorite color was {color}.",
    "{He} always wore {a_color} hat.",
    "{He} had {a_look} {color} bag that {he} carried everywhere.",
    "{hero} was a little shy, but {he} had a big heart.",
    "{hero} was always full of questions.",
    "Every morning, {he} ate {number} {foods} for breakfast.",
    "{His} best friend was {friend}, {a_friend_kind} {trait}.",
    "{He} lived with {adult} and a sleepy old {pet_kind}.",
    "{hero} was {age} years old, and {he} knew how to count to a hundred.",
    "{His} favorite food in the world was {food} pie.",
    "{His} room was full of {toys}, books, and drawings.",
    "{He} could whistle, hop on one foot, and say the alphabet backwards.",
    "Everyone in {town} knew {hero}, because {he} always said hello.",
    "Next to {his} house stood a big old tree with a swing.",
]

HOBBY_LINES = ["{He} loved {hobby} more than anything.",
               "{He} liked {hobby}, and {he} was very good at it.",
               "More than anything, {hero} liked {hobby}."]

SCENES = [
    "{Place} was full of {color} flowers.",
    "Birds were singing in the trees.",
    "There were {number} {animals} {at_place}, and they looked busy.",
    "The grass was soft and green.",
    "A little stream ran past, going splash, splash, splash.",
    "The air smelled like fresh {foods}.",
    "Somewhere far away, a dog was barking.",
    "Bees buzzed from flower to flower.",
    "The trees were so tall that they seemed to touch the clouds.",
    "{A_animal} watched them from {spot3}.",
    "It was very quiet, and {hero} could hear {his} own heart beating.",
    "{A_look} {animal} hurried past with something in its mouth.",
    "The church bell in {town} rang {number} times.",
]

DIALOGUE_FILLERS = [
    '"What a {good_day} day!" said {hero}.',
    '"I wonder what will happen next," {hero} said to {himself}.',
    '"Come on, let\'s go!" {hero} shouted.',
    '"Look at that!" said {friend}, pointing at {a_animal}.',
    '"{Sound}!" said {a_animal} nearby.',
    '"Are you hungry?" asked {friend}. "I am always hungry," said {hero}.',
]

PLOTS = {
    "lost_toy": [
        ["{hero} had {a_toy} that {he} took everywhere.",
         "{hero}'s favorite thing in the whole world was {his} {toy}.",
         "{adult} gave {hero} {a_toy} for {his} birthday, and {he} loved it very much."],
        ["One afternoon, {he} took it {at_place} to play.",
         "{He} brought the {toy_noun} with {him} when {he} went to {place}.",
         "That day, {he} carried the {toy_noun} all the way to {place}."],
        ["{He} played and played until the sky turned orange.",
         "{He} saw {a_animal} and ran after it to say hello.",
         "{He} put the {toy_noun} down to pick some flowers."],
        ["When it was time to go home, the {toy_noun} was gone!",
         "Then {he} looked down. {His} hands were empty. The {toy_noun} was not there!",
         "But when {he} turned around, the {toy_noun} had disappeared."],
        ['"Oh no! Where is my {toy_noun}?" {hero} cried.',
         '"My {toy_noun}! I lost my {toy_noun}!" said {hero}, and {his} eyes filled with tears.',
         '{hero} felt very {bad}. "I will never find it," {he} whispered.'],
        ['{friend} came running. "Don\'t be {bad}, {hero}. I will help you look," {fhe} said.',
         '{friend} saw {him} and asked, "Why are you so {bad}?" {hero} told {fhim} everything.',
         '"We can look together," said {friend}, and {fhe} took {hero}\'s hand.'],
        ["They looked {spot}. They looked {spot2}. It was not there.",
         "First they searched {spot}, and then {spot2}, but they found only {a_animal}.",
         "They searched high and low, {spot} and {spot2}."],
        ['At last, {friend} shouted, "I see it!" The {toy_noun} was {spot3}.',
         "Then {a_animal} came out from {spot3}, and the {toy_noun} was right there!",
         "Just when they wanted to give up, {hero} saw something {color} {spot3}. "
         "It was the {toy_noun}!"],
    ],
    "new_friend": [
        ["{At_place}, {hero} saw {a_friend_kind} sitting all alone.",
         "One day {at_place}, {hero} met a new {friend_kind} named {friend}.",
         "{hero} noticed that {friend} was sitting by {fhimself} {at_place}."],
        ["{Fhe} looked {bad} and did not want to play.",
         "Nobody was playing with {fhim}, and {fhe} looked at the ground.",
         '"Hello," said {hero}. But {friend} only looked away, feeling shy.'],
        ['{hero} walked over and said, "Hi! My name is {hero}. Do you want to play with me?"',
         '{hero} took a deep breath and said, "Would you like to share my {foods}?"',
         '"You can play with my {toy_noun} if you want," {hero} said with a smile.'],
        ['{friend} smiled for the first time. "Yes, please," {fhe} said.',
         '{friend} looked up. "Really? Thank you!" {fhe} said.',
         "At first {friend} did not answer. Then {fhe} nodded and gave a little smile."],
        ["They played {game} until the sun went down.",
         "Together they {activity}, and they laughed so much their bellies hurt.",
         "They {activity}, and then they shared {number} {foods}."],
        ['When it was time to go, {friend} asked, "Can we play again tomorrow?"',
         "{adult} called {hero} home for dinner, but {hero} did not want to leave.",
         "Before they went home, they made up a secret handshake."],
    ],
    "sharing": [
        ["{hero} and {friend} were playing {at_place}.",
         "{hero} and {friend} were best friends, and they did everything together.",
         "{hero} went to play with {friend} {at_place}."],
        ["{friend} had a new {toy}, and {hero} wanted it very much.",
         "There was only one {toy}, and both of them wanted it.",
         "{adult} brought {number} {foods}, but {hero} wanted all of them."],
        ['"It\'s mine!" shouted {hero}. "No, it\'s mine!" shouted {friend}.',
         '{hero} grabbed it and said, "I had it first!"',
         '"Give it to me!" said {hero}, pulling hard.'],
        ["They pulled and pulled, and both of them felt {bad}.",
         "{friend} started to cry, and {hero} felt {bad} too.",
         "Soon nobody was having fun anymore."],
        ['{adult} came over and said, "Why don\'t you take turns?"',
         '{adult} knelt down and asked, "What could you do so that you are both happy?"',
         'Then {hero} remembered what {adult} always said: "Sharing makes fun bigger."'],
        ['{hero} thought for a moment. "You can go first," {he} said to {friend}.',
         '"Let\'s share," said {hero}. "You play, and then I play."',
         '{hero} gave half to {friend}. "Here, this is for you," {he} said.'],
    ],
    "fear": [
        ["{hero} was afraid of {fear}.",
         "There was one thing {hero} did not like at all: {fear}.",
         "Even though {hero} was brave about many things, {fear} made {him} shake."],
        ["Whenever {he} thought about it, {his} tummy felt funny.",
         '"I can\'t do it," {he} always said. "It is too scary."',
         "{He} would hide behind {adult} and close {his} eyes."],
        ["One day {at_place}, {he} had to face {fear}.",
         "That {weather} day, {friend} asked {him} to come and see {fear} together.",
         "Then something happened {at_place} that made {him} think again."],
        ['{adult} held {his} hand and said, "Being brave means doing it even when you are scared."',
         '{friend} said, "I will stay right next to you. We can count to {number} together."',
         '"You are braver than you think," said {adult} with a warm smile.'],
        ["{hero} took a deep breath. {He} counted to {number}.",
         "{hero} closed {his} eyes, took one small step, and then another.",
         "Slowly, {hero} stood up tall and tried."],
        ["It was not so scary after all!",
         "{He} did it! {His} heart was beating fast, but {he} was smiling.",
         '"I did it!" {hero} shouted. "That was not scary at all!"'],
    ],
    "helping": [
        ["{At_place}, {hero} heard a small sound.",
         "While walking {at_place}, {hero} saw something move {spot}.",
         "{hero} and {friend} were walking {at_place} when they heard a cry."],
        ["It was {a_animal} with a hurt leg.",
         "There was {a_animal} stuck {spot}. It could not get out.",
         "{A_animal} was there, and it looked cold and hungry."],
        ['"Poor little {animal}," said {hero}. "I will help you."',
         '"Don\'t worry," {hero} whispered. "You are safe now."',
         '{hero} knelt down gently. "Are you okay, little {animal}?" {he} asked.'],
        ["{He} wrapped it in {his} {color} scarf and carried it home.",
         "{He} gave it some water and a piece of {food}.",
         "{He} asked {adult} for help, and together they made a soft bed in a box."],
        ["Every day {hero} took care of the {animal}. Soon it was strong again.",
         "After a few days, the {animal} could walk and play again.",
         "The {animal} got better and better, and {hero} was so {good}."],
        ["Then it was time to say goodbye. The {animal} went back to {place}.",
         "When the {animal} was well, {hero} let it go free {at_place}.",
         'One morning, the {animal} was ready to go home. "Goodbye, little friend," said {hero}.'],
    ],
    "adventure": [
        ["{hero} wanted to go on an adventure.",
         '"Today I will go exploring," {hero} said to {friend}.',
         "{hero} packed {his} bag with {number} {foods} and {a_toy}."],
        ["{He} walked past {place} and kept going until {he} reached {place2}.",
         "{hero} and {friend} followed a little path to {place2}.",
         "They walked and walked until they came to {place2}."],
        ["There {he} found {a_look} {color} door {spot}.",
         "Suddenly {he} saw {a_look} {color} stone that glowed in the light.",
         "There was an old map {spot}, with a big red X on it.",
         "Inside a hollow tree, there was a tiny box with a key."],
        ['"What is this?" {hero} said, eyes wide open.',
         '"Wow!" said {friend}. "Let\'s find out where it goes!"',
         "{hero} felt {good} and a little bit {bad} at the same time."],
        ["They followed it past {spot}, over a little bridge, and into {place3}.",
         "It led them all the way to {place3}, where {a_animal} was waiting for them.",
         "At the end, they found a garden full of {color} flowers and {number} sleepy {animals}."],
        ["It was the best surprise ever.",
         "They had found a secret place that only they knew about.",
         "They sat down, ate their {foods}, and watched the sky."],
    ],
    "making_gift": [
        ["It was almost {adult}'s birthday.",
         "{hero} wanted to make something special for {adult}.",
         "{adult} had been {bad} all week, so {hero} wanted to cheer {ahim} up."],
        ['"I will bake {a_food} cake," {hero} decided.',
         '"I will make a card with {color} stars on it," said {hero}.',
         '"I will paint a picture of {place}," {hero} said with a grin.'],
        ["{He} got the flour, the eggs, and a big bowl.",
         "{He} found paper, glue, and {number} {color} crayons.",
         "{friend} came to help, and they worked very hard."],
        ["But oh no! Everything spilled on the floor.",
         "But the {pet_kind} jumped on the table and made a big mess!",
         "Then the glue got stuck on {his} fingers, and the paper tore."],
        ['{hero} felt {bad}. "Now it is ruined," {he} said.',
         '"What will we do now?" asked {friend}.',
         "{hero} wanted to give up, but then {he} had an idea."],
        ["They cleaned up and started again, slowly and carefully this time.",
         "{He} tried again, and this time it worked.",
         "They fixed it together, and it looked even better than before."],
        ['When {adult} saw the gift, {ahe} smiled and said, "This is the best gift ever!"',
         '{adult} gave {hero} a big hug. "Thank you, my dear," {ahe} said.',
         "{adult} was so happy that {ahe} put it in the middle of the table for everyone to see."],
    ],
    "rainy_picnic": [
        ["{hero} and {adult} planned a picnic {at_place}.",
         "Today was picnic day! {hero} packed {foods} and {a_color} blanket.",
         '"Can we have a picnic {at_place}?" asked {hero}. "Yes," said {adult}.'],
        ["But just as they sat down, dark clouds came and it began to rain.",
         "Then the sky turned gray, and big drops of rain started to fall.",
         "Suddenly the wind blew hard, and rain came pouring down."],
        ['"Oh no, our picnic!" said {hero}.',
         '{hero} felt {bad}. "Now the day is ruined," {he} said.',
         "They ran home as fast as they could, wet from head to toe."],
        ['"I know!" said {adult}. "We can have a picnic inside!"',
         'Then {hero} had an idea. "Let\'s build a tent from pillows and eat inside!"',
         '{friend} knocked on the door. "Can I join your indoor picnic?" {fhe} asked.'],
        ["They spread the blanket on the floor and ate {foods}.",
         "They listened to the rain and told stories while they ate.",
         "They played games and ate {number} {foods} each."],
        ["It turned out to be the best picnic ever.",
         "When the rain stopped, there was a big rainbow in the sky.",
         '"Rainy days can be fun too," said {hero} with a smile.'],
    ],
    "broken_rule": [
        ['{adult} said, "Please do not touch the {look} vase on the shelf."',
         '"Do not go near {place} alone," {adult} told {hero}.',
         '{adult} said, "Do not play ball in the house."'],
        ["But {hero} was curious. {He} wanted to look just once.",
         "{hero} nodded, but {he} did not really listen.",
         "When {adult} went out, {hero} forgot all about it."],
        ["Crash! Something fell and broke into pieces.",
         "Then {he} heard a loud crash, and {his} heart jumped.",
         "{He} slipped and fell, and the {toy_noun} broke."],
        ["{hero} felt {bad}. {He} wanted to hide.",
         '"Oh no, what have I done?" {hero} whispered.',
         "{He} thought about hiding it so nobody would know."],
        ['But then {he} went to {adult} and said, "I am sorry. I did not listen."',
         '{hero} told the truth. "It was me," {he} said, looking at {his} feet.',
         "{hero} decided to be honest and told {adult} everything."],
        ['{adult} hugged {him}. "Thank you for telling me the truth," {ahe} said.',
         '{adult} said, "Things can be fixed. I am proud that you told me."',
         "{adult} was not angry. Together they fixed what was broken."],
    ],
    "race": [
        ["{hero} and {friend} decided to have a race {at_place}.",
         '"Let\'s race to {place2}!" said {friend}.',
         "There was a big race {at_place}, and {hero} wanted to win."],
        ["They stretched their legs and jumped up and down to get ready.",
         '{friend} said, "I am the fastest {friend_kind} in {town}!"',
         "{adult} drew a line in the dirt with a stick for the start."],
        ['"Ready, set, go!" They ran as fast as they could.',
         "{adult} clapped {ahis} hands, and off they went.",
         'They lined up. "One, two, three, go!" called {adult}.'],
        ["{hero} was in front, but then {he} tripped over a rock.",
         "Halfway there, {friend} fell down and hurt {fhis} knee.",
         "{hero} was winning, until {he} heard {friend} call for help."],
        ["{hero} stopped running and went back.",
         "Instead of running on, {hero} helped {friend} get up.",
         '"Are you okay?" asked {hero}. "Here, hold my hand."'],
        ["They finished the race together, side by side.",
         "They walked the rest of the way, laughing and talking.",
         "Everyone cheered when they crossed the line together."],
    ],
    "wish": [
        ["{At_place}, {hero} found {a_look} {color} {magic_thing}.",
         "One day, {a_animal} gave {hero} {a_magic_thing} and said it could grant one wish.",
         "{Spot}, {hero} saw {a_magic_thing} that shone like a star."],
        ['"Make a wish," said a tiny voice.',
         "When {he} held it, it began to sparkle.",
         '"Is it magic?" asked {friend}. "Let\'s find out!"'],
        ['{hero} thought hard. "I wish for a mountain of {foods}!" {he} said.',
         '"I wish I could fly like a bird," {hero} said.',
         '"I wish I had {number} {toys}," said {hero}.'],
        ["Poof! Just like that, {his} wish came true.",
         "There was a flash of {color} light, and the wish came true.",
         "Suddenly, it happened!"],
        ["At first it was great fun. But soon {hero} felt {bad}.",
         "But then {he} saw that {friend} was {bad} and alone.",
         "But it was not as much fun as {he} thought it would be."],
        ['{hero} closed {his} eyes. "I wish everything was like before," {he} said.',
         "{He} shared everything with {friend} and the other kids.",
         "{He} gave the {magic_thing} to {friend} so {fhe} could make a wish too."],
    ],
    "growing": [
        ["{hero} got a tiny seed from {adult}.",
         '"This seed will grow into {a_plant}," {adult} told {hero}.',
         "{hero} found {number} little seeds {at_place}."],
        ["{He} planted it in {a_color} pot and gave it water.",
         "{He} dug a small hole in the garden and put the seed inside.",
         "{hero} and {friend} planted the seeds in a neat row."],
        ["Every day {he} looked at it, but nothing happened.",
         '"Why is it not growing?" {hero} asked, feeling {bad}.',
         "Days went by, and there was only dirt."],
        ['"Be patient," said {adult}. "Good things take time."',
         '"Plants need sun, water, and time," {adult} said kindly.',
         "{hero} kept giving it water, even when {he} did not see any change."],
        ["One morning, a tiny green leaf popped out of the dirt!",
         "Then one day, {hero} saw a little green sprout.",
         "After many days, there was a small plant with {color} buds."],
        ["By the end of {season}, it had grown into {a_plant}.",
         "Soon it was taller than {hero}!",
         "{hero} was so {good}. {He} had grown it all by {himself}."],
    ],
    "snow_day": [
        ["When {hero} woke up, everything outside was white with snow.",
         "It snowed all night, and in the morning all of {town} was covered in snow.",
         '{adult} said, "No school today! It is a snow day!"'],
        ["{hero} put on {his} boots, {his} {color} mittens, and a warm scarf.",
         "{He} ran outside in {his} {color} coat and woolly hat.",
         "{hero} and {friend} grabbed the sled and ran to the top of the hill."],
        ['"Let\'s build a snowman!" said {friend}.',
         "They rolled a big snowball, then a smaller one, then a tiny one for the head.",
         "They zoomed down the hill on the sled, faster and faster."],
        ["They used {number} pebbles for the buttons and a carrot for the nose.",
         "The snowman had a crooked smile made of sticks and {a_color} scarf.",
         "Whoosh! They fell into a big pile of snow and laughed and laughed."],
        ["But then the sun came out, and the snowman began to melt.",
         "Then {friend} lost a mitten in the snow, and {fhis} fingers got cold.",
         "But it got colder and colder, and {hero}'s nose turned pink."],
        ['"Don\'t be {bad}," said {adult}. "Come inside and have some hot cocoa."',
         "They went inside, where it was warm and cozy, and drank warm milk with honey.",
         "{adult} made pancakes, and they warmed their toes by the fire."],
    ],
    "night_sky": [
        ["It was bedtime, but {hero} was not sleepy at all.",
         "That night, {hero} could not fall asleep.",
         "{hero} lay in bed and looked out at the dark sky."],
        ["The moon was big and round, and the stars twinkled.",
         'Outside, an owl said "Hoo, hoo" in the dark.',
         "{He} counted the stars: one, two, three, four, so many!"],
        ['"Why does the moon shine?" {he} asked {adult}.',
         '"Where do the stars go in the morning?" {hero} wondered.',
         '"I wish I could visit the moon," {hero} whispered.'],
        ['{adult} sat on the bed and said, "The moon shines because the sun lights it up."',
         '{adult} smiled. "The stars are always there. In the day the sun is too bright to see them."',
         "{adult} opened a big book about space, and they looked at pictures of planets."],
        ["{hero} imagined flying in {a_color} rocket past Mars and Jupiter.",
         "{hero} closed {his} eyes and pictured the stars dancing in the sky.",
         "{He} thought about all the animals sleeping in their nests and burrows."],
        ["Soon {his} eyes grew heavy.",
         "{He} yawned a big yawn and snuggled under the blanket.",
         "Slowly, {he} drifted off to sleep."],
    ],
    "new_pet": [
        ["{adult} had a surprise for {hero}: a box with holes in the lid.",
         '"We are getting a pet!" {adult} told {hero} one morning.',
         "{hero} had always wanted a pet {pet_kind}."],
        ["Inside was a tiny {pet_kind} with {look} fur and big eyes.",
         "At the pet shop, a little {pet_kind} looked at {hero} and wiggled.",
         "A small {pet_kind} was waiting at the animal shelter, all alone."],
        ['"I will call you {pet_name}," {hero} said.',
         '"What should we name it?" asked {adult}. "{Pet_name}!" said {hero}.',
         "{hero} named it {pet_name}, and it seemed to like that name."],
        ["{hero} learned to give {pet_name} food and fresh water every morning.",
         "Taking care of a pet was a lot of work. {hero} had to clean its bed every week.",
         "{pet_name} chewed {hero}'s {toy_noun} and made a mess of the room."],
        ["One day {pet_name} ran away {at_place}!",
         "But one day, {pet_name} did not want to eat, and {hero} was {bad}.",
         "{pet_name} was scared of a loud noise and hid {spot}."],
        ["{hero} called softly, and {pet_name} came running back.",
         "{adult} took {pet_name} to the animal doctor, who said it only needed rest.",
         "{hero} sat next to {pet_name} and talked to it gently until it felt safe."],
    ],
    "sea_trip": [
        ["{hero} and {adult} went out on the sea in a little {color} boat.",
         "One {season} day, {hero} went sailing with {friend} and {adult}.",
         "{hero} had never been on a boat before."],
        ["The waves went up and down, and seagulls flew over their heads.",
         "The water was blue and clear, and {he} could see fish swimming below.",
         "A salty wind filled the sail, and the boat went fast."],
        ['Suddenly, {friend} pointed and shouted, "Look, a dolphin!"',
         "They saw a small island with one palm tree in the middle.",
         "Something shiny was floating in the water next to the boat."],
        ["They rowed to the island and found an old wooden chest in the sand.",
         "{hero} reached out and pulled up a glass bottle with a note inside.",
         "The dolphin jumped and splashed, as if it wanted to play."],
        ['"Treasure!" cried {hero}. But inside there were only seashells and a drawing.',
         'The note said: "Whoever finds this, please be my friend." It came from far away.',
         '"It is saying hello!" laughed {adult}.'],
        ["Then the clouds turned dark, and they sailed back to the harbor.",
         "When the sun began to set, they turned the boat toward home.",
         "{adult} steered the boat home while {hero} waved goodbye to the sea."],
    ],
    "school_day": [
        ["It was {hero}'s first day at a new school.",
         "Today {hero} would start school in the town of {town}.",
         "{hero} held {adult}'s hand tight at the school gate."],
        ['"What if nobody likes me?" {he} asked quietly.',
         "{His} tummy felt full of butterflies.",
         "{He} did not know anyone, and the classroom looked very big."],
        ["The teacher, {teacher}, smiled and showed {him} a desk by the window.",
         '{teacher} said, "Welcome! We are so happy you are here."',
         "There were books, paints, a fish tank, and a big map on the wall."],
        ["At first {hero} sat alone and did not say a word.",
         "During story time, {hero} was too shy to speak.",
         "At lunch, {hero} did not know where to sit."],
        ['Then {friend} sat next to {him} and said, "Do you like {foods}? I have extra."',
         'Then {friend} asked, "Do you want to paint with me?"',
         "{friend} waved from across the room and made a funny face, and {hero} laughed."],
        ["They painted a picture of {a_animal} together.",
         "They learned the letters A, B, and C, and sang a song about numbers.",
         "At playtime, they played {game} with the other kids."],
    ],
    "cooking": [
        ["{adult} and {hero} went to the market to buy food for dinner.",
         "{adult} gave {hero} a basket and {number} shiny coins.",
         "It was {hero}'s job to help cook dinner tonight."],
        ["They bought carrots, potatoes, onions, and a big green cabbage.",
         "At the market there were stalls with {foods}, cheese, bread, and flowers.",
         "The farmer sold them fresh beans, corn, and tomatoes."],
        ["At home, {hero} washed the vegetables in cold water.",
         "{adult} cut the vegetables while {hero} stirred the pot with a wooden spoon.",
         "{hero} added a pinch of salt and some herbs from the garden."],
        ["The soup bubbled and smelled wonderful.",
         "Soon the whole kitchen smelled warm and delicious.",
         '{hero} tasted it. "It needs a little more salt," {he} said like a real chef.'],
        ["But when {hero} tasted it again, it was much too salty!",
         "Then the pot boiled over, and soup spilled on the stove.",
         "{friend} knocked on the door, and {fhe} was very hungry."],
        ["They added more water and potatoes, and it was just right.",
         "{adult} laughed and cleaned it up, and they tried again.",
         "They set another bowl on the table, and everyone ate together."],
    ],
    "camping": [
        ["{hero}'s family went camping in the woods near {town}.",
         "{hero} and {adult} put up {a_color} tent {at_place}.",
         '"Tonight we sleep outside!" said {adult}.'],
        ["They gathered sticks and made a small fire.",
         "They toasted marshmallows on long sticks until they were golden and gooey.",
         "They sat by the fire and sang songs."],
        ["When it got dark, they heard a strange noise outside the tent.",
         "In the night, something rustled in the bushes.",
         "Crack! A branch snapped nearby."],
        ['"What was that?" whispered {hero}, holding {his} flashlight.',
         '{hero} hid under the sleeping bag. "Is it a bear?" {he} asked.',
         "{hero} was {bad}, but {he} wanted to see."],
        ["{adult} shined the flashlight, and there was only {a_animal}, looking for food.",
         "It was just a raccoon trying to open their bag of {foods}!",
         "It was only {friend}, who had gone to get a drink of water."],
        ["Everyone laughed, and {hero} was not scared anymore.",
         "They laughed so loud that the owls woke up.",
         "{hero} gave a piece of {food} to the little visitor."],
    ],
    "music_show": [
        ["There was going to be a music show in {town}.",
         '"Will you play in the show?" asked {teacher}.',
         "{hero} was going to play the {instrument} at the school show."],
        ["{hero} practiced the {instrument} every day after school.",
         "{He} practiced in the bathroom, in the garden, and even for the {pet_kind}.",
         "Every evening, {he} played the same song on {his} {instrument} again and again."],
        ["On the night of the show, the hall was full of people.",
         "When {he} stepped on the stage, the lights were bright and everyone was looking at {him}.",
         "Behind the curtain, {his} hands were shaking."],
        ["{hero} forgot how the song began!",
         "{He} played a wrong note, and someone giggled.",
         '{He} whispered to {friend}, "I can\'t do it."'],
        ["Then {he} saw {adult} in the front row, smiling and waving.",
         '{friend} gave {him} a thumbs up. "You can do it!" {fhe} said.',
         "{hero} took a deep breath and started again from the beginning."],
        ["This time, the music came out loud and clear.",
         "{He} played the whole song, and everyone clapped and cheered.",
         "The music filled the room, and people tapped their feet."],
    ],
    "getting_lost": [
        ["{hero} went to {place} with {adult}.",
         "{hero} and {adult} went to the busy market in {town}.",
         "On {day}, {adult} took {hero} to the big fair in {town}."],
        ["{hero} saw {a_animal} and followed it.",
         "{hero} stopped to look at {a_toy} in a shop window.",
         "There were so many people, and {hero} let go of {adult}'s hand."],
        ["When {he} looked up, {adult} was gone!",
         "{He} turned around, but {adult} was nowhere to be seen.",
         "Everything looked strange, and {he} did not know which way to go."],
        ['"{Adult}! Where are you?" {he} called.',
         "{hero} felt very small and very {bad}.",
         "{His} lip began to shake, and a tear ran down {his} cheek."],
        ['{He} remembered what {adult} said: "If you get lost, stay where you are and ask a helper."',
         'A kind {helper} saw {him} and asked, "Are you lost? Let\'s find your family."',
         "{hero} stood still next to a lamp post and waited, just like {ahe} had taught {him}."],
        ["Soon {adult} came running and gave {him} the biggest hug.",
         'Then {he} heard a voice calling, "{hero}! {hero}!" It was {adult}!',
         "The {helper} helped {him}, and soon {hero} was back with {adult}."],
    ],
}

# Plots that only make sense in some weather; the others take any.
PLOT_WEATHER = {"snow_day": ["snowy"], "rainy_picnic": ["sunny", "cloudy", "windy"],
                "sea_trip": ["sunny", "windy", "cloudy"], "night_sky": ["sunny", "chilly", "windy"],
                "camping": ["sunny", "cloudy", "windy"], "race": ["sunny", "cloudy", "windy", "chilly"]}

# Words that may lead into a beat starting with {He}, {hero} or They.
TRANSITIONS = ["Then", "After a while", "Soon", "Just then", "Later", "A little later",
               "After that", "All of a sudden", "Before long", "Meanwhile"]

ENDINGS = {
    "lost_toy": ['{hero} hugged the {toy_noun} tight. "Thank you, {friend}!" {he} said.',
                 "{hero} held the {toy_noun} close all the way home.",
                 "{hero} laughed and gave {friend} a big hug."],
    "new_friend": ["From that day on, {hero} and {friend} were best friends.",
                   "{hero} was glad {he} had said hello.",
                   '"See you tomorrow!" they both said at the same time.'],
    "sharing": ["They played together and had more fun than before.",
                "Sharing made them both happy.",
                '{friend} smiled. "You are a good friend, {hero}," {fhe} said.'],
    "fear": ["After that, {hero} was not afraid of {fear} anymore.",
             "{hero} felt proud of {himself}.",
             "That night, {hero} told everyone how brave {he} had been."],
    "helping": ["Sometimes, when {hero} went {at_place}, the {animal} came to say hello.",
                "{hero} felt warm inside. Helping others felt good.",
                "{hero} never forgot the little {animal}."],
    "adventure": ["When the sun went down, they walked home, tired and happy.",
                  "{hero} could not wait for the next adventure.",
                  '"Let\'s come back tomorrow," whispered {friend}.'],
    "making_gift": ["{hero} learned that a gift made with love is the best kind.",
                    "{hero} felt proud and warm inside.",
                    "It was a happy day for everyone."],
    "rainy_picnic": ["{hero} learned that a day can be good even when plans change.",
                     "They all went to bed with full bellies and big smiles.",
                     "{hero} hoped it would rain again soon."],
    "broken_rule": ["From then on, {hero} always listened to {adult}.",
                    "{hero} learned that telling the truth is always better.",
                    "{hero} felt light and happy again."],
    "race": ["Nobody won, but they both felt like winners.",
             "{hero} learned that helping a friend is better than winning.",
             '"You are the best friend ever," said {friend}.'],
    "wish": ["{hero} learned that the best things are the ones you share.",
             "{hero} was happy with what {he} had.",
             "After that, {hero} kept the {magic_thing} in a safe place, just in case."],
    "growing": ["{hero} learned that good things take time.",
                "{hero} shared what grew with everyone on the street.",
                "Every day after that, {hero} sang to {his} plant."],
    "snow_day": ["{hero} fell asleep dreaming of snowflakes.",
                 '"Can it snow again tomorrow?" asked {hero}.',
                 "It was the best snow day ever."],
    "night_sky": ["{He} dreamed of shooting stars all night long.",
                  "Good night, moon. Good night, stars. Good night, {hero}.",
                  "In the morning, {he} told {adult} all about {his} dream."],
    "new_pet": ["{hero} and {pet_name} were the best of friends.",
                "Every night, {pet_name} slept at the end of {hero}'s bed.",
                '"I love you, {pet_name}," said {hero}.'],
    "sea_trip": ["{hero} kept a shell from that day on {his} window.",
                 "{hero} decided that one day {he} would be a sailor.",
                 "That night, {hero} could still feel the boat rocking as {he} fell asleep."],
    "school_day": ['When {adult} came, {hero} said, "Can I come back tomorrow?"',
                   "{hero} was not scared of school anymore.",
                   "School was going to be fun after all."],
    "cooking": ['"This is the best soup in the world," said {adult}.',
                "{hero} was proud to be a cook.",
                "They ate every last drop."],
    "camping": ["They fell asleep listening to the crickets.",
                "In the morning, the birds woke them up with a song.",
                "{hero} could not wait to go camping again."],
    "music_show": ['"You were wonderful!" said {adult} after the show.',
                   "{hero} bowed, and {his} cheeks turned pink.",
                   "{hero} learned that everyone makes mistakes, and that is okay."],
    "getting_lost": ["After that, {hero} always stayed close to {adult}.",
                     "{hero} said thank you to the {helper} and waved goodbye.",
                     '"I was scared," said {hero}. "Me too," said {adult}, holding {him} tight.'],
}

AFTERWORDS = [
    'That night, {hero} told {adult} all about {his} day. "What a story!" said {adult}.',
    "At dinner, {hero} told everyone what had happened. {adult} listened and smiled.",
    '"I am proud of you," {adult} said when {hero} came home.',
    "Later, {hero} drew a picture of the whole day and put it on the wall.",
    "{hero} and {friend} talked about it all the way home.",
]

CLOSINGS = ["The end.", "And they lived happily ever after.",
            "It was a very good day.", "{hero} smiled as {he} fell asleep that night.",
            "{He} would remember this day for a long time.",
            "And that is how {hero} learned something new.",
            "Then {he} went home for dinner."]

# ---------------------------------------------------------------------------------
# Story generator
# ---------------------------------------------------------------------------------

IRREGULAR_PLURALS = {"mouse": "mice", "goose": "geese", "sheep": "sheep", "fish": "fish",
                     "goldfish": "goldfish", "deer": "deer", "moose": "moose",
                     "wolf": "wolves", "octopus": "octopuses", "reindeer": "reindeer",
                     "gingerbread man": "gingerbread men", "scarf": "scarves",
                     "leaf": "leaves"}


def plural(noun):
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith(("s", "x", "ch", "sh")) or noun in ("tomato", "potato", "mango"):
        return noun + "es"
    return noun + "s"


def article(noun):
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def pronouns(prefix, he):
    """Pronoun keys for one character, e.g. prefix "f" gives fhe, fhim, fhis, fhimself."""
    him, his, himself = ("him", "his", "himself") if he == "he" else ("her", "her", "herself")
    return {prefix + "he": he, prefix + "him": him, prefix + "his": his,
            prefix + "himself": himself}


def make_character(rng):
    """A name, the pronoun "he"/"she" and a kind ("girl", "little fox", ...)."""
    if rng.random() < 0.3:
        size = rng.choice(["little", "small", "young", "tiny", "curious", "clever", "brave"])
        animal = rng.choice(HERO_ANIMALS)
        return rng.choice(PET_NAMES), rng.choice(["he", "she"]), f"{size} {animal}"
    he = rng.choice(["he", "she"])
    name = rng.choice(BOYS if he == "he" else GIRLS)
    kind = "boy" if he == "he" else "girl"
    return name, he, rng.choice(["", "little ", "kind ", "happy ", "young ", "clever "]) + kind


def make_adult(rng):
    """A grown-up from the family or the town, with a pronoun."""
    if rng.random() < 0.6:
        return rng.choice(FAMILY)
    title, he = rng.choice([("Mr.", "he"), ("Mrs.", "she"), ("Miss", "she"),
                            ("Aunt", "she"), ("Uncle", "he")])
    name = rng.choice(SURNAMES) if title in ("Mr.", "Mrs.", "Miss") else \
        rng.choice(BOYS if he == "he" else GIRLS)
    return f"{title} {name}", he


def make_context(rng, plot):
    """Pick the cast, the setting and the props of one story."""
    hero, he, hero_kind = make_character(rng)
    friend, fhe, friend_kind = make_character(rng)
    while friend == hero:
        friend, fhe, friend_kind = make_character(rng)
    adult, ahe = make_adult(rng)
    (place, prep), (place2, _), (place3, _) = rng.sample(PLACES, 3)
    weather = rng.choice(PLOT_WEATHER.get(plot, sorted(WEATHER)))
    animal, toy_noun, food = rng.choice(ANIMALS), rng.choice(TOYS), rng.choice(FOODS)
    spots = rng.sample(HIDING_SPOTS, 3)
    ctx = {
        "hero": hero, "hero_kind": hero_kind, "a_hero_kind": article(hero_kind),
        "friend": friend, "friend_kind": friend_kind, "a_friend_kind": article(friend_kind),
        "adult": adult, "teacher": f"{rng.choice(['Mr.', 'Mrs.', 'Miss'])} {rng.choice(SURNAMES)}",
        "place": place, "place2": place2, "place3": place3, "at_place": f"{prep} {place}",
        "town": rng.choice(TOWN_STARTS) + rng.choice(TOWN_ENDS), "home": rng.choice(HOMES),
        "weather": weather, "season": WEATHER[weather][0], "day": rng.choice(DAYS),
        "animal": animal, "animals": plural(animal), "a_animal": article(animal),
        "Sound": ANIMAL_SOUNDS.get(animal, "Hello"),
        "toy_noun": toy_noun, "toy": f"{rng.choice(COLORS)} {toy_noun}", "toys": plural(toy_noun),
        "food": food, "foods": plural(food), "a_food": article(food),
        "color": rng.choice(COLORS), "look": rng.choice(LOOKS), "hair": rng.choice(HAIR),
        "good": rng.choice(GOOD_FEELINGS), "bad": rng.choice(BAD_FEELINGS),
        "good_day": rng.choice(["lovely", "wonderful", "beautiful", "great", "fun"]),
        "number": rng.choice(NUMBER_WORDS), "age": rng.choice(NUMBER_WORDS[1:6]),
        "spot": spots[0], "spot2": spots[1], "spot3": spots[2],
        "fear": rng.choice(FEARS), "a_plant": rng.choice(PLANTS),
        "magic_thing": rng.choice(MAGIC_THINGS), "game": rng.choice(GAMES),
        "activity": rng.choice(ACTIVITIES), "instrument": rng.choice(INSTRUMENTS),
        "pet_kind": rng.choice(PET_KINDS), "pet_name": rng.choice(PET_NAMES),
        "helper": rng.choice(HELPERS),
    }
    for key in ("toy", "color", "look", "magic_thing"):
        ctx["a_" + key] = article(ctx[key])
    ctx.update(pronouns("", he))
    ctx.update(pronouns("f", fhe))
    ctx.update(pronouns("a", ahe))
    ctx["trait"] = rng.choice(TRAITS).format(fhis=ctx["fhis"])
    ctx["hobby"] = rng.choice(HOBBIES).format(his=ctx["his"], adult=adult)
    ctx["opening"] = rng.choice(OPENINGS).format(weather=weather, season=ctx["season"],
                                                 day=ctx["day"])
    return ctx


class Capitalising(dict):
    """Template values where {Key} is {key} with a capital first letter."""

    def __missing__(self, key):
        value = self[key[0].lower() + key[1:]]
        return value[0].upper() + value[1:]


def fill(template, ctx):
    text = template.format_map(ctx)
    return text[0].upper() + text[1:]


def with_transition(rng, beat):
    """Sometimes lead a beat in with "Then, ...", to vary the rhythm."""
    if rng.random() < 0.25:
        for start, lower in (("{He} ", "{he} "), ("They ", "they "), ("{hero} ", "{hero} ")):
            if beat.startswith(start):
                return f"{rng.choice(TRANSITIONS)}, {lower}{beat[len(start):]}"
    return beat


def make_story(rng):
    """One story: an opening paragraph, the plot in two paragraphs, and an ending."""
    plot = rng.choice(sorted(PLOTS))
    ctx = Capitalising(make_context(rng, plot))

    opening = [rng.choice(INTROS)] + rng.sample(DETAILS, rng.randint(1, 4))
    if rng.random() < 0.7:
        opening.insert(rng.randint(1, len(opening)), rng.choice(HOBBY_LINES))
    opening.insert(rng.randint(1, len(opening)), rng.choice(WEATHER[ctx["weather"]][1]))

    beats = [with_transition(rng, rng.choice(beat)) for beat in PLOTS[plot]]
    extras = rng.sample(SCENES, rng.randint(0, 3)) + rng.sample(DIALOGUE_FILLERS, rng.randint(0, 2))
    for extra in extras:
        beats.insert(rng.randint(1, len(beats) - 1), extra)
    split = rng.randint(2, len(beats) - 2)
    middle = [beats[:split], beats[split:]]

    ending = [rng.choice(ENDINGS[plot])]
    if rng.random() < 0.6:
        ending.append(rng.choice(AFTERWORDS))
    if rng.random() < 0.6:
        ending.append(rng.choice(CLOSINGS))

    paragraphs = [opening, *middle, ending]
    return "\n\n".join(" ".join(fill(line, ctx) for line in p) for p in paragraphs)


def make_stories(num_stories=NUM_STORIES, seed=SEED):
    """Distinct stories, always the same ones in the same order for the same seed."""
    rng = random.Random(seed)
    stories, seen = [], set()
    while len(stories) < num_stories:
        story = make_story(rng)
        if story not in seen:
            seen.add(story)
            stories.append(story)
    return stories


# ---------------------------------------------------------------------------------
# Writing the assets
# ---------------------------------------------------------------------------------


def write_text(path, text):
    path.write_bytes(text.encode("utf-8"))  # bytes: "\n" stays "\n" on every OS


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_corpus(stories, corpus_dir):
    """JSON Lines, gzipped with no file name and no timestamp in the header."""
    corpus_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": story}) + "\n" for story in stories)
    with open(corpus_dir / CORPUS_FILE, "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as gz:
            gz.write(lines.encode("utf-8"))
    write_text(corpus_dir / "README.md", CORPUS_README)


def train_tokenizer(stories):
    """Byte-level BPE (as in GPT-2): any text encodes, and decode(encode(text)) == text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(stories, trainer=trainer, length=len(stories))
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        sys.exit(f"tokenizer has {tokenizer.get_vocab_size()} tokens, expected {VOCAB_SIZE}: "
                 "the corpus has too few distinct words")
    return tokenizer


def write_model_dir(tokenizer, model_dir, model_config):
    """config.json and tokenizer files, loadable with AutoConfig/AutoTokenizer."""
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    special_tokens = {key: TOKENIZER_CONFIG[key] for key in ("bos_token", "eos_token", "unk_token")}
    write_json(model_dir / "tokenizer_config.json", TOKENIZER_CONFIG)
    write_json(model_dir / "special_tokens_map.json", special_tokens)
    config = dict(model_config, bos_token_id=tokenizer.token_to_id(TOKENIZER_CONFIG["bos_token"]),
                  eos_token_id=tokenizer.token_to_id(TOKENIZER_CONFIG["eos_token"]))
    write_json(model_dir / "config.json", config)


def make_assets(out_dir):
    stories = make_stories()
    write_corpus(stories, out_dir / CORPUS_DIR)
    tokenizer = train_tokenizer(stories)
    write_model_dir(tokenizer, out_dir / MODEL_DIR, MODEL_CONFIG)
    write_model_dir(tokenizer, out_dir / MOE_MODEL_DIR, MOE_CONFIG)


# ---------------------------------------------------------------------------------
# --check: compare the committed assets with a fresh build
# ---------------------------------------------------------------------------------


def asset_files(root):
    return sorted(p.relative_to(root).as_posix() for d in (CORPUS_DIR, MODEL_DIR, MOE_MODEL_DIR)
                  for p in (root / d).rglob("*") if p.is_file())


def read_asset(path):
    """File bytes; for .gz the decompressed bytes (zlib builds may compress differently)."""
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def differences(committed, fresh):
    problems = []
    for name in sorted(set(asset_files(committed)) | set(asset_files(fresh))):
        if not (committed / name).is_file():
            problems.append(f"missing: {name}")
        elif not (fresh / name).is_file():
            problems.append(f"not made by this script: {name}")
        elif read_asset(committed / name) != read_asset(fresh / name):
            problems.append(f"differs: {name}")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="fail if the assets differ from what this script makes now")
    parser.add_argument("--out", type=Path, default=ASSETS_DIR,
                        help="directory to write (or, with --check, to check); default: assets/")
    args = parser.parse_args()

    if not args.check:
        make_assets(args.out)
        print(f"wrote {args.out / CORPUS_DIR}, {args.out / MODEL_DIR} and {args.out / MOE_MODEL_DIR}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_assets(Path(tmp))
        problems = differences(args.out, Path(tmp))
    for problem in problems:
        print(f"{args.out}: {problem}")
    if problems:
        sys.exit("assets are stale: run python tools/make_assets.py")
    print("assets are up to date")


if __name__ == "__main__":
    main()
