"""Word lists for the embedded model's story, greeting and topic generators.

Written by hand for this project; nothing here is downloaded.
"""

GIRL_NAMES = """Anna Mia Lily Emma Sofia Zoe Lucy Ava Ella Chloe Maya Nora Ruby Grace Hannah Alice
Rosa Leila Amara Yuki Mei Priya Fatima Ingrid Olga Isabel Clara Daisy Molly Poppy Hazel Iris
Luna Stella Julia Nina Sara Lena Aisha Zara Kiara Sakura Ana Carmen Elena Freya Greta Ivy
Jade Kate Laura Marta Nadia Paula Rita Tara Wendy Lina Amelia Bella Eva Fiona Gemma Heidi
Jenny Kim Maria Noor Olivia Penny Sophie Tessa Uma Vera Willow Yara""".split()

BOY_NAMES = """Tom Sam Leo Max Ben Jack Oscar Noah Liam Finn Eli Adam Omar Hugo Felix Kai Ravi
Diego Hiro Ivan Karl Luca Mateo Nico Pablo Ali Arjun Chen Dev Emil Farid Gus Henry Isaac
Jonas Kofi Lars Marco Nils Otto Peter Quinn Rafael Simon Theo Victor Walter Yusuf Zane Alex
Bruno Charlie Daniel Ethan George Harry Jamal Kenji Louis Milo Oliver Patrick Ryan Toby Umar
Vincent William Andre Caleb Dylan Erik Frank Jasper Mohan Rohan""".split()

SURNAMES = """Smith Brown Garcia Chen Kim Patel Novak Silva Rossi Muller Khan Okafor Tanaka Ivanova
Johnson Lopez Nguyen Costa Andersen Petrov Haddad Mensah Sato Martin Dubois Schmidt Kowalski
Fischer Moreau Santos Ali Rahman Wong Park Jensen Larsen Murphy Walsh Hughes Clarke""".split()

# (noun, article)
ANIMALS = [
    ("rabbit", "a"), ("fox", "a"), ("bear", "a"), ("mouse", "a"), ("cat", "a"), ("dog", "a"),
    ("owl", "an"), ("duck", "a"), ("turtle", "a"), ("squirrel", "a"), ("hedgehog", "a"),
    ("frog", "a"), ("lion", "a"), ("elephant", "an"), ("penguin", "a"), ("puppy", "a"),
    ("kitten", "a"), ("pony", "a"), ("goat", "a"), ("lamb", "a"), ("deer", "a"), ("bird", "a"),
    ("dragon", "a"), ("unicorn", "a"), ("tiger", "a"), ("monkey", "a"), ("whale", "a"),
    ("dolphin", "a"), ("panda", "a"), ("koala", "a"), ("badger", "a"), ("otter", "an"),
    ("wolf", "a"), ("hen", "a"), ("cow", "a"), ("pig", "a"), ("horse", "a"), ("seal", "a"),
]

PEOPLE = [
    "girl", "boy", "princess", "prince", "farmer", "fisherman", "baker", "king", "queen",
    "teacher", "sailor", "knight", "painter", "girl", "boy", "doctor", "gardener", "shepherd",
    "inventor", "wizard", "witch", "pilot", "musician", "scientist", "explorer", "tailor",
]
FEMALE_PEOPLE = {"girl", "princess", "queen", "witch"}
MALE_PEOPLE = {"boy", "prince", "king", "fisherman", "wizard"}

CHAR_ADJ = [
    "little", "young", "brave", "curious", "kind", "shy", "clever", "old", "cheerful", "tiny",
    "gentle", "happy", "lonely", "funny", "quiet", "friendly", "busy", "small", "wise", "playful",
    "clumsy", "hungry", "sleepy", "proud", "careful", "smart", "honest", "bold",
]

PLACES = [
    "a land far away", "a small village by the sea", "a big green forest", "a quiet little town",
    "a castle on a hill", "a busy city", "a farm near the river", "a little house at the edge of the woods",
    "a kingdom in the mountains", "a sunny island", "a snowy valley", "a cozy cottage",
    "a garden full of flowers", "a tall tree in the park", "a village near a lake",
    "a small house on a hill", "a faraway land", "a kingdom by the sea", "a deep dark forest",
    "a town with a big clock tower", "a meadow full of daisies", "a cave behind a waterfall",
    "a hut in the jungle", "a lighthouse on the rocks", "a busy market town", "an old mill by a stream",
    "a quiet street in a big city", "a ship on the wide blue sea", "a desert full of golden sand",
    "a school at the top of a hill",
]

FAMILY = ["mother", "father", "grandmother", "grandfather", "big sister", "little brother",
          "aunt", "uncle", "two brothers", "three sisters", "family"]

HOBBIES = [
    "sing songs", "paint pictures", "read books", "play in the garden", "climb trees",
    "look at the stars", "bake bread", "collect shells", "watch the birds", "build things",
    "dance in the rain", "tell stories", "run in the fields", "swim in the lake", "fly kites",
    "play the flute", "draw maps", "plant flowers", "ask questions", "explore new places",
    "help other people", "play with friends", "count the clouds", "make music", "go fishing",
]

OBJECTS = [
    ("a red ball", "the ball"), ("a shiny key", "the key"), ("a golden coin", "the coin"),
    ("a blue hat", "the hat"), ("an old map", "the map"), ("a magic stone", "the stone"),
    ("a little bell", "the bell"), ("a wooden box", "the box"), ("a silver ring", "the ring"),
    ("a green kite", "the kite"), ("a warm scarf", "the scarf"), ("a yellow umbrella", "the umbrella"),
    ("a favorite book", "the book"), ("a tiny boat", "the boat"), ("a glass jar", "the jar"),
    ("a music box", "the music box"), ("a drawing", "the drawing"), ("a special feather", "the feather"),
]

FOODS = ["apples", "berries", "honey", "bread", "carrots", "soup", "cake", "cookies", "fish",
         "nuts", "cheese", "pancakes", "pie", "rice", "oranges", "sandwiches", "plums"]

GOOD_FEELINGS = ["happy", "proud", "glad", "calm", "thankful", "joyful", "excited", "warm inside",
                 "brave", "safe", "hopeful", "cheerful"]
BAD_FEELINGS = ["sad", "scared", "worried", "lonely", "upset", "nervous", "afraid", "tired",
                "confused", "angry", "unhappy", "a little scared"]

WEATHER = ["It was a sunny morning.", "It was a cold winter day.", "It was a warm summer evening.",
           "It was a rainy afternoon.", "The wind was blowing hard that day.", "Snow was falling softly.",
           "The sun was shining brightly.", "It was a foggy morning.", "It was a clear night full of stars.",
           "Autumn leaves were falling from the trees.", "It was the first day of spring."]

LESSONS = [
    "friends are more important than treasure",
    "it is good to ask for help",
    "being kind is always the right choice",
    "you should never give up",
    "sharing makes everyone happy",
    "it is brave to tell the truth",
    "everyone is good at something",
    "small things can make a big difference",
    "home is where the people you love are",
    "it is okay to make mistakes",
    "patience is a great gift",
    "working together makes hard things easy",
    "listening is as important as talking",
    "being different is a good thing",
    "a true friend helps you when things are hard",
]

JOBS = ["a teacher", "a doctor", "a nurse", "an engineer", "a farmer", "a baker", "a student",
        "a writer", "an artist", "a pilot", "a scientist", "a programmer", "a musician", "a chef",
        "a gardener", "a librarian", "a driver", "a designer", "a photographer", "a vet",
        "a dentist", "a carpenter", "a software developer", "a data scientist", "a firefighter"]

LIKES = ["reading books", "playing football", "drawing", "cooking", "music", "dancing", "swimming",
         "playing chess", "hiking in the mountains", "learning new languages", "gardening", "math",
         "writing stories", "riding my bike", "playing the piano", "taking photos", "painting",
         "watching movies", "playing video games", "science", "animals", "running", "baking cakes",
         "computers", "building robots", "looking at the stars", "singing", "traveling"]

COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "black", "white",
          "brown", "gray", "gold"]

FAV_ANIMALS = ["cats", "dogs", "horses", "dolphins", "owls", "rabbits", "elephants", "penguins",
               "foxes", "turtles", "lions", "pandas"]

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve"]
