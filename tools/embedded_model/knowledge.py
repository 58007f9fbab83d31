"""Facts and simple explanations for the embedded model's corpus, written by hand.

Every topic is a bank of short sentences in simple words; the generator picks and
orders some of them, so each paragraph is different but stays on topic.
"""

# ----------------------------------------------------------------------------------
# Simple facts: (question, short answer, full sentence)
# ----------------------------------------------------------------------------------
SCIENCE_QA = [
    ("What is the largest planet in the solar system?", "Jupiter", "Jupiter is the largest planet in the solar system."),
    ("What is the closest star to the Earth?", "The Sun", "The Sun is the closest star to the Earth."),
    ("What planet do we live on?", "The Earth", "We live on the planet Earth."),
    ("How many planets are in the solar system?", "Eight", "There are eight planets in the solar system."),
    ("What is the hottest planet?", "Venus", "Venus is the hottest planet in the solar system."),
    ("Which planet is called the Red Planet?", "Mars", "Mars is called the Red Planet because its soil is full of rust."),
    ("What is the closest planet to the Sun?", "Mercury", "Mercury is the closest planet to the Sun."),
    ("Which planet has the biggest rings?", "Saturn", "Saturn has the biggest and brightest rings of all the planets."),
    ("What does the Moon go around?", "The Earth", "The Moon goes around the Earth about once a month."),
    ("How long does the Earth take to go around the Sun?", "About one year", "The Earth takes about one year, or 365 days, to go around the Sun."),
    ("How long is one day on Earth?", "24 hours", "One day on Earth is 24 hours long, the time the Earth takes to spin once."),
    ("At what temperature does water boil?", "100 degrees Celsius", "Water boils at 100 degrees Celsius at sea level."),
    ("At what temperature does water freeze?", "0 degrees Celsius", "Water freezes at 0 degrees Celsius and turns into ice."),
    ("What is water made of?", "Hydrogen and oxygen", "Water is made of hydrogen and oxygen. Its formula is H2O."),
    ("What gas do plants take in from the air?", "Carbon dioxide", "Plants take in carbon dioxide from the air and give out oxygen."),
    ("What gas do we need to breathe?", "Oxygen", "People and animals need oxygen to breathe."),
    ("What is the largest ocean?", "The Pacific Ocean", "The Pacific Ocean is the largest and deepest ocean on Earth."),
    ("What is the tallest mountain in the world?", "Mount Everest", "Mount Everest is the tallest mountain in the world. It is in the Himalayas."),
    ("What is the largest desert?", "Antarctica", "The largest desert is Antarctica, because it gets very little rain or snow. The largest hot desert is the Sahara."),
    ("What is the largest hot desert?", "The Sahara", "The Sahara in Africa is the largest hot desert in the world."),
    ("How many continents are there?", "Seven", "There are seven continents: Africa, Antarctica, Asia, Australia, Europe, North America and South America."),
    ("What is the largest continent?", "Asia", "Asia is the largest continent, and it has the most people."),
    ("What is the smallest continent?", "Australia", "Australia is the smallest continent."),
    ("What is the largest country in the world?", "Russia", "Russia is the largest country in the world by area."),
    ("What is the smallest country in the world?", "Vatican City", "Vatican City is the smallest country in the world."),
    ("What is the longest river in the world?", "The Nile", "The Nile in Africa is usually called the longest river in the world. The Amazon is almost as long."),
    ("Which river carries the most water?", "The Amazon", "The Amazon River in South America carries more water than any other river."),
    ("How many oceans are there?", "Five", "There are five oceans: the Pacific, the Atlantic, the Indian, the Southern and the Arctic Ocean."),
    ("What is the largest animal?", "The blue whale", "The blue whale is the largest animal that has ever lived."),
    ("What is the fastest land animal?", "The cheetah", "The cheetah is the fastest land animal. It can run faster than 100 kilometers per hour."),
    ("What is the tallest animal?", "The giraffe", "The giraffe is the tallest animal in the world."),
    ("Is a whale a fish?", "No, a whale is a mammal", "A whale is not a fish. It is a mammal that breathes air and feeds its babies with milk."),
    ("Is a bat a bird?", "No, a bat is a mammal", "A bat is not a bird. It is a mammal that can fly."),
    ("How many legs does a spider have?", "Eight", "A spider has eight legs. An insect has six legs."),
    ("How many legs does an insect have?", "Six", "An insect has six legs and three body parts."),
    ("What do bees make?", "Honey", "Bees make honey from the nectar of flowers."),
    ("What do caterpillars turn into?", "Butterflies", "Caterpillars turn into butterflies or moths."),
    ("What do plants need to grow?", "Sunlight, water and air", "Plants need sunlight, water, air and good soil to grow."),
    ("How many bones are in the human body?", "206", "An adult human body has 206 bones."),
    ("What pumps blood around the body?", "The heart", "The heart is a strong muscle that pumps blood around the body."),
    ("What organ do we think with?", "The brain", "We think with our brain. It controls the whole body."),
    ("How many days are in a year?", "365", "A year has 365 days, and a leap year has 366 days."),
    ("How many days are in a week?", "Seven", "A week has seven days: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday."),
    ("How many hours are in a day?", "24", "A day has 24 hours."),
    ("How many minutes are in an hour?", "60", "An hour has 60 minutes, and a minute has 60 seconds."),
    ("What are the three states of matter?", "Solid, liquid and gas", "The three common states of matter are solid, liquid and gas, like ice, water and steam."),
    ("What makes a rainbow?", "Sunlight and raindrops", "A rainbow appears when sunlight shines through raindrops and splits into many colors."),
    ("Why is the sky blue?", "Because air scatters blue light", "The sky is blue because the air scatters the blue part of sunlight more than the other colors."),
    ("What causes day and night?", "The spinning of the Earth", "Day and night happen because the Earth spins. The side facing the Sun has day."),
    ("What causes the seasons?", "The tilt of the Earth", "The seasons happen because the Earth is tilted as it goes around the Sun."),
    ("What pulls things down to the ground?", "Gravity", "Gravity is the force that pulls things down to the ground."),
    ("Who first walked on the Moon?", "Neil Armstrong", "Neil Armstrong was the first person to walk on the Moon, in 1969."),
    ("What is the speed of light?", "About 300,000 kilometers per second", "Light travels at about 300,000 kilometers per second."),
    ("What is the chemical symbol for gold?", "Au", "The chemical symbol for gold is Au."),
    ("What is the chemical symbol for water?", "H2O", "The chemical formula for water is H2O."),
    ("What is the freezing point of water in Fahrenheit?", "32 degrees Fahrenheit", "Water freezes at 32 degrees Fahrenheit."),
    ("What is the biggest bird?", "The ostrich", "The ostrich is the biggest bird. It cannot fly, but it runs very fast."),
    ("What do we call animals that eat only plants?", "Herbivores", "Animals that eat only plants are called herbivores."),
    ("What do we call animals that eat meat?", "Carnivores", "Animals that eat meat are called carnivores."),
    ("What is the center of an atom called?", "The nucleus", "The center of an atom is called the nucleus."),
    ("What is 2 plus 2?", "4", "2 plus 2 is 4."),
    ("What is 10 times 10?", "100", "10 times 10 is 100."),
    ("What is half of 50?", "25", "Half of 50 is 25."),
    ("How many sides does a triangle have?", "Three", "A triangle has three sides."),
    ("How many sides does a square have?", "Four", "A square has four equal sides."),
    ("What is the largest island in the world?", "Greenland", "Greenland is the largest island in the world."),
    ("What is the coldest continent?", "Antarctica", "Antarctica is the coldest continent on Earth."),
    ("What is the Great Barrier Reef?", "A huge coral reef", "The Great Barrier Reef is a huge coral reef near Australia."),
    ("What language has the most native speakers?", "Mandarin Chinese", "Mandarin Chinese has the most native speakers in the world."),
    ("What does a thermometer measure?", "Temperature", "A thermometer measures temperature."),
    ("What does a compass show?", "North", "A compass has a needle that points north."),
    ("What is photosynthesis?", "How plants make food from sunlight", "Photosynthesis is the way plants use sunlight, water and air to make their own food."),
    ("What is the water cycle?", "How water moves around the Earth", "In the water cycle, water evaporates, forms clouds, falls as rain and flows back to the sea."),
    ("What is a volcano?", "A mountain that can erupt", "A volcano is a mountain with hot melted rock inside that can erupt."),
    ("What is an earthquake?", "A shaking of the ground", "An earthquake is a sudden shaking of the ground caused by moving rocks deep under the surface."),
    ("What is electricity?", "A flow of tiny charged particles", "Electricity is a flow of tiny charged particles called electrons."),
    ("What is DNA?", "The instructions for living things", "DNA is a long molecule that holds the instructions for building and running a living thing."),
]

# More short facts, used in fact paragraphs.
SCIENCE_FACTS = [s for _, _, s in SCIENCE_QA] + [
    "The Earth is the third planet from the Sun.",
    "The Sun is a star, a huge ball of hot gas.",
    "Light from the Sun takes about eight minutes to reach the Earth.",
    "The Moon has no air and no weather.",
    "Mars has two small moons.",
    "Jupiter is a giant ball of gas.",
    "Stars look small because they are very far away.",
    "Sound travels faster in water than in air.",
    "Ice is lighter than water, so it floats.",
    "Most of the Earth's surface is covered by water.",
    "Clouds are made of tiny drops of water or ice.",
    "Lightning is a giant spark of electricity in the sky.",
    "Thunder is the sound that lightning makes.",
    "Trees give us wood, fruit and fresh air.",
    "Fish breathe with gills.",
    "Birds have feathers and lay eggs.",
    "Frogs start their lives as tadpoles in the water.",
    "Penguins live mostly in the southern half of the world.",
    "Polar bears live in the Arctic.",
    "Camels can go for many days without drinking water.",
    "Octopuses have eight arms.",
    "Dolphins are mammals that live in the sea.",
    "Our bodies are made mostly of water.",
    "The skin is the largest organ of the human body.",
    "Magnets pull on iron and steel.",
    "Metals like copper carry electricity well.",
    "Plants grow toward the light.",
    "The Earth is about four and a half billion years old.",
    "Dinosaurs lived on Earth millions of years ago.",
    "The Equator is an imaginary line around the middle of the Earth.",
    "The North Pole is in the Arctic, and the South Pole is in Antarctica.",
    "Mountains are formed when pieces of the Earth's crust push against each other.",
    "Rivers flow from high places down to the sea.",
    "A lake is a large body of water surrounded by land.",
    "An island is land with water all around it.",
    "The Atlantic Ocean lies between the Americas and Europe and Africa.",
    "The Himalayas are the highest mountains in the world.",
    "The Amazon rainforest is the largest rainforest in the world.",
    "Africa has more countries than any other continent.",
    "Europe has many small countries close together.",
    "South America is home to the Andes, a long chain of mountains.",
    "The Alps are mountains in Europe.",
    "The Mediterranean Sea lies between Europe and Africa.",
    "China and India are the countries with the most people.",
]

# ----------------------------------------------------------------------------------
# Topics: opener sentences (start a paragraph), body sentences, closers.
# ----------------------------------------------------------------------------------
TOPICS = {}

TOPICS["AI"] = dict(
    names=["AI", "artificial intelligence"],
    openers=[
        "AI, or artificial intelligence, is the science of making computers that can learn and think.",
        "Artificial intelligence, or AI, is a way to make computers do things that usually need human intelligence.",
        "AI is a kind of computer program that learns from examples instead of following only fixed rules.",
        "Artificial intelligence is the field of computer science that tries to build smart machines.",
        "AI stands for artificial intelligence. It means teaching computers to solve problems in a smart way.",
    ],
    body=[
        "An AI system learns patterns from a lot of data.",
        "For example, it can learn to recognize cats in photos after it sees thousands of pictures of cats.",
        "Today, AI helps us translate languages, answer questions and find the fastest way home.",
        "Language models are a kind of AI that read a lot of text and learn to predict the next word.",
        "AI is used in medicine to help doctors find diseases early.",
        "Phones use AI to understand our voices and to sort our photos.",
        "AI can write text, draw pictures and even help people write computer code.",
        "AI is not magic: it is math, data and a lot of computing power.",
        "AI can make mistakes, so people still need to check its work.",
        "Good AI should be safe, fair and useful for everyone.",
        "Many scientists and engineers work every day to make AI more helpful and more reliable.",
        "Some AI programs can play games like chess better than any human.",
        "An AI model is trained on examples, and then it is used to make predictions about new things.",
        "AI works best when people and machines work together.",
    ],
    closers=[
        "AI is a powerful tool, and we should use it wisely.",
        "In short, AI is a tool that helps people do more.",
        "AI will keep changing the way we live and work.",
        "Learning about AI is a great way to understand the world of tomorrow.",
    ],
)

TOPICS["the future of AI"] = dict(
    names=["the future of AI"],
    openers=[
        "The future of AI is bright and full of possibilities.",
        "The future of AI is exciting, but it also brings new questions.",
        "The future of AI is something that many people think and talk about.",
        "The future of AI is hard to predict, but it will surely change our lives.",
        "The future of AI is in our hands, and we must build it with care.",
        "The future of AI is full of promise for science, medicine and education.",
    ],
    body=[
        "In the coming years, AI will help doctors find diseases earlier and find new medicines.",
        "AI tutors may help every child learn at their own speed.",
        "Scientists will use AI to study the climate, design new materials and explore space.",
        "AI assistants will become more helpful and easier to talk to.",
        "Cars and robots may become smarter and safer with the help of AI.",
        "Many jobs will change, and people will learn new skills to work with AI.",
        "It is important that AI stays safe, honest and fair.",
        "Governments and companies are writing rules so that AI is used in a responsible way.",
        "AI models will become smaller and faster, so they can run on phones and laptops.",
        "AI could help farmers grow more food with less water.",
        "Some people worry that AI could be misused, so we need to think carefully about how we build it.",
        "The best future is one where AI helps people instead of replacing them.",
        "Researchers are working to make AI explain its answers, so that people can trust it.",
    ],
    closers=[
        "If we use it wisely, AI can make the world a better place.",
        "The future of AI depends on the choices we make today.",
        "AI will be a powerful partner for people in the years to come.",
        "It is an exciting time to learn about AI.",
    ],
)

TOPICS["machine learning"] = dict(
    names=["machine learning"],
    openers=[
        "Machine learning is a part of AI where computers learn from data.",
        "Machine learning means teaching a computer by showing it many examples.",
        "In machine learning, a program finds patterns in data by itself.",
    ],
    body=[
        "Instead of writing every rule by hand, we give the computer examples with the right answers.",
        "The computer adjusts millions of small numbers, called weights, to make fewer mistakes.",
        "This process is called training.",
        "After training, the model can make good guesses about new data it has never seen.",
        "Machine learning is used to filter spam emails, recommend movies and recognize speech.",
        "A neural network is a popular kind of machine learning model inspired by the brain.",
        "More data and more computing power usually make the models better.",
        "It is important to test a model on data that it did not see during training.",
    ],
    closers=[
        "Machine learning is the engine behind most modern AI.",
        "That is the basic idea of machine learning: learning from examples.",
    ],
)

TOPICS["programming"] = dict(
    names=["programming", "coding"],
    openers=[
        "Programming is the art of giving instructions to a computer.",
        "Programming means writing code that tells a computer what to do, step by step.",
        "Learning to program is like learning a new language that computers understand.",
    ],
    body=[
        "The best way to learn programming is to write code every day, even for a few minutes.",
        "Start with a simple language like Python.",
        "Begin with small programs, like a calculator or a guessing game.",
        "Make small projects that you care about, because they keep you motivated.",
        "Do not be afraid of errors: every error message is a clue.",
        "Read other people's code to see how they solve problems.",
        "Break big problems into small steps and solve one step at a time.",
        "Practice is more important than reading; you learn by doing.",
        "Ask questions, join a community and share what you build.",
        "Learn how to use a debugger and how to test your code.",
        "When you get stuck, take a break and explain the problem out loud.",
        "Build a real project, like a small website or a game, from start to finish.",
        "Over time, you will learn loops, functions, data structures and how to design programs.",
        "Be patient with yourself; every programmer was a beginner once.",
    ],
    closers=[
        "With practice and patience, anyone can learn to program.",
        "Keep coding, keep building, and have fun.",
        "Programming is a skill that grows a little every day.",
    ],
)

TOPICS["quantum computing"] = dict(
    names=["quantum computing", "quantum computers"],
    openers=[
        "Quantum computing is a new kind of computing that uses the strange rules of very small particles.",
        "A quantum computer is a computer that uses quantum physics to solve some problems much faster.",
        "Quantum computing is a way of computing that works very differently from a normal computer.",
        "In simple terms, quantum computing uses tiny particles to do many calculations in a new way.",
    ],
    body=[
        "A normal computer uses bits, and each bit is either 0 or 1.",
        "A quantum computer uses qubits, and a qubit can be 0 and 1 at the same time.",
        "This is called superposition.",
        "Qubits can also be linked together, so that one qubit depends on another. This is called entanglement.",
        "You can think of a coin spinning in the air: while it spins, it is both heads and tails.",
        "Because of superposition and entanglement, a quantum computer can explore many possibilities at once.",
        "Quantum computers could help design new medicines and materials.",
        "They could also break some of the codes we use today to keep information secret.",
        "Quantum computers are very hard to build, because qubits are fragile and must be kept very cold.",
        "Today's quantum computers are still small and make many errors.",
        "Quantum computers will not replace normal computers; they will help with special problems.",
        "Scientists around the world are working to make quantum computers bigger and more reliable.",
    ],
    closers=[
        "In short, quantum computing is a new tool for some of the hardest problems in science.",
        "Quantum computing is still young, but it could change science in the future.",
        "That is quantum computing in simple terms: qubits, superposition and entanglement.",
    ],
)

TOPICS["the internet"] = dict(
    names=["the internet"],
    openers=[
        "The internet is a huge network that connects computers all over the world.",
        "The internet lets computers and phones around the world talk to each other.",
    ],
    body=[
        "Information travels through cables, radio waves and satellites.",
        "Data is broken into small packets that find their own way to the other side.",
        "The web is a part of the internet made of pages that we open in a browser.",
        "We use the internet to send messages, watch videos, learn and work.",
        "Every device on the internet has an address, so the data knows where to go.",
        "It is important to stay safe online and to protect our passwords.",
        "The internet started as a small research network and grew to connect billions of people.",
    ],
    closers=["The internet has changed how people live, learn and work together."],
)

TOPICS["computers"] = dict(
    names=["computers"],
    openers=[
        "A computer is a machine that follows instructions to work with information.",
        "Computers are machines that can store, process and share information very quickly.",
    ],
    body=[
        "The processor is the brain of the computer; it does the calculations.",
        "Memory holds the data the computer is working on right now.",
        "A program is a list of instructions written by a programmer.",
        "Computers work with numbers made only of zeros and ones.",
        "A graphics card, or GPU, can do many calculations at the same time.",
        "Computers are in phones, cars, washing machines and even toys.",
        "The first computers filled whole rooms, but today a phone is far more powerful.",
    ],
    closers=["Computers have become one of the most useful tools people have ever made."],
)

TOPICS["robots"] = dict(
    names=["robots"],
    openers=[
        "A robot is a machine that can sense the world around it and move on its own.",
        "Robots are machines that can do work for people.",
    ],
    body=[
        "Robots use sensors, like cameras, to see what is around them.",
        "Motors help robots move their arms and wheels.",
        "A computer inside the robot decides what to do next.",
        "Robots build cars in factories and help doctors in hospitals.",
        "Some robots explore places that are dangerous for people, like the deep sea or Mars.",
        "Small robots can clean floors or cut the grass.",
    ],
    closers=["Robots help people do hard, boring or dangerous jobs."],
)

TOPICS["the Sun"] = dict(
    names=["the Sun"],
    openers=[
        "The Sun is the star at the center of our solar system.",
        "The Sun is a giant ball of hot, glowing gas.",
    ],
    body=[
        "It gives the Earth light and warmth.",
        "Without the Sun, there would be no life on Earth.",
        "The Sun is so big that more than a million Earths could fit inside it.",
        "Light from the Sun takes about eight minutes to reach us.",
        "Plants use sunlight to make their food.",
        "You should never look straight at the Sun, because it can hurt your eyes.",
        "The Sun is about four and a half billion years old.",
    ],
    closers=["The Sun is the most important star for life on Earth."],
)

TOPICS["the Moon"] = dict(
    names=["the Moon"],
    openers=["The Moon is the Earth's natural satellite.", "The Moon is our closest neighbor in space."],
    body=[
        "It goes around the Earth about once a month.",
        "The Moon does not make its own light; it reflects the light of the Sun.",
        "The shape of the Moon seems to change during the month. These shapes are called phases.",
        "The Moon pulls on the oceans and causes the tides.",
        "People first walked on the Moon in 1969.",
        "The Moon has no air, so there is no wind and no sound.",
    ],
    closers=["The Moon has always filled people with wonder."],
)

TOPICS["the ocean"] = dict(
    names=["the ocean", "the sea"],
    openers=["The ocean covers most of the surface of the Earth.", "The oceans are huge bodies of salt water."],
    body=[
        "The Pacific Ocean is the largest and deepest ocean.",
        "Millions of kinds of animals and plants live in the sea.",
        "Tiny plants in the ocean make a large part of the oxygen we breathe.",
        "Ocean water is salty, so we cannot drink it.",
        "Waves are made by the wind blowing over the water.",
        "The deepest parts of the ocean are dark and very cold.",
        "Whales, dolphins, sharks and turtles all live in the ocean.",
    ],
    closers=["We must keep the oceans clean, because all life depends on them."],
)

TOPICS["plants"] = dict(
    names=["plants"],
    openers=["Plants are living things that make their own food from sunlight.", "Plants are everywhere around us, from tiny mosses to giant trees."],
    body=[
        "They use sunlight, water and carbon dioxide to make sugar. This is called photosynthesis.",
        "Plants give out oxygen, which people and animals need to breathe.",
        "Roots hold the plant in the ground and drink water from the soil.",
        "Leaves catch the sunlight.",
        "Many plants grow flowers, and flowers turn into fruits and seeds.",
        "Bees and other insects help flowers make seeds.",
        "We eat many plants, like rice, wheat, apples and carrots.",
    ],
    closers=["Without plants, there would be no food and no air to breathe."],
)

TOPICS["gravity"] = dict(
    names=["gravity"],
    openers=["Gravity is the force that pulls things toward each other.", "Gravity is an invisible pull that every object has."],
    body=[
        "It is the reason a ball falls down when you drop it.",
        "The Earth's gravity keeps us on the ground.",
        "Gravity keeps the Moon going around the Earth and the Earth going around the Sun.",
        "Bigger objects have stronger gravity.",
        "On the Moon, gravity is weaker, so you could jump much higher.",
        "Isaac Newton described gravity, and Albert Einstein explained it in a new way.",
    ],
    closers=["Gravity holds the whole universe together."],
)

TOPICS["electricity"] = dict(
    names=["electricity"],
    openers=["Electricity is a kind of energy that comes from tiny particles called electrons.", "Electricity is energy that flows through wires."],
    body=[
        "When electrons move through a wire, we call it an electric current.",
        "Electricity powers our lights, phones, computers and fridges.",
        "Power plants make electricity from the wind, the sun, water, or by burning fuel.",
        "Batteries store electricity so we can use it later.",
        "Electricity can be dangerous, so we must use it carefully.",
        "Lightning is electricity in the sky.",
    ],
    closers=["Modern life would be very different without electricity."],
)

TOPICS["music"] = dict(
    names=["music"],
    openers=["Music is the art of putting sounds together in a beautiful way.", "Music is found in every culture in the world."],
    body=[
        "It is made of rhythm, melody and harmony.",
        "People play music with their voices and with instruments like the piano, the guitar and the drum.",
        "Music can make us feel happy, calm or sad.",
        "Learning to play an instrument takes practice and patience.",
        "People sing together at festivals, weddings and games.",
        "Music helps us remember things and brings people together.",
    ],
    closers=["Music is a language that everyone can understand."],
)

TOPICS["reading"] = dict(
    names=["reading", "books"],
    openers=["Reading is one of the best ways to learn about the world.", "Books can take us to places we have never been."],
    body=[
        "When we read, we learn new words and new ideas.",
        "Stories help us understand how other people feel.",
        "Reading every day makes us better at writing and thinking.",
        "A library is a place where anyone can borrow books for free.",
        "Some people like adventure stories, and others like books about science or history.",
        "Reading before bed can help you relax.",
    ],
    closers=["A good book is a friend that you can visit again and again."],
)

TOPICS["friendship"] = dict(
    names=["friendship", "friends"],
    openers=["Friendship is one of the most important things in life.", "A friend is someone who cares about you."],
    body=[
        "Good friends listen to each other and help each other.",
        "Friends share happy times and help us through sad times.",
        "To have a good friend, you must be a good friend.",
        "Friends can be very different from each other and still get along.",
        "Saying sorry and forgiving are important parts of friendship.",
        "Spending time together makes a friendship stronger.",
    ],
    closers=["True friends make life brighter."],
)

TOPICS["health"] = dict(
    names=["health", "staying healthy"],
    openers=["Staying healthy means taking good care of your body and your mind.", "Good health is one of the greatest gifts we have."],
    body=[
        "Eating fruit and vegetables gives the body what it needs.",
        "Drinking water is better than drinking sugary drinks.",
        "Exercise makes the heart and muscles strong.",
        "Children need about ten hours of sleep every night, and adults need about eight.",
        "Washing your hands helps stop germs from spreading.",
        "Spending time outside and with friends is good for the mind.",
        "Doctors and nurses help us when we are sick.",
    ],
    closers=["Small healthy habits every day make a big difference."],
)

TOPICS["space"] = dict(
    names=["space", "the universe"],
    openers=["Space is the huge, dark place beyond the Earth's sky.", "The universe is everything that exists: all the stars, planets and galaxies."],
    body=[
        "Our solar system has the Sun, eight planets and many moons.",
        "The Earth is part of a galaxy called the Milky Way.",
        "There are billions of galaxies, and each one has billions of stars.",
        "Astronauts travel to space in rockets and live on the International Space Station.",
        "In space there is no air, so astronauts need special suits.",
        "Telescopes help us see stars and galaxies that are very far away.",
        "Robots have explored Mars and sent back pictures.",
    ],
    closers=["Space is full of mysteries that scientists are still trying to solve."],
)

TOPICS["dinosaurs"] = dict(
    names=["dinosaurs"],
    openers=["Dinosaurs were reptiles that lived on Earth millions of years ago.", "Dinosaurs ruled the Earth for more than 150 million years."],
    body=[
        "Some dinosaurs were as small as chickens, and others were longer than a bus.",
        "Tyrannosaurus rex was a big meat eater with sharp teeth.",
        "Many dinosaurs ate only plants.",
        "We learn about dinosaurs from fossils, which are bones turned into stone.",
        "Most dinosaurs died out about 66 million years ago, probably after a huge rock from space hit the Earth.",
        "Birds are the living relatives of dinosaurs.",
    ],
    closers=["Dinosaurs still amaze children and scientists today."],
)

TOPICS["the weather"] = dict(
    names=["the weather", "weather"],
    openers=["The weather is what the air outside is like on a given day.", "Weather changes from day to day."],
    body=[
        "It can be sunny, cloudy, rainy, windy or snowy.",
        "Rain falls when tiny drops in the clouds join together and become heavy.",
        "Snow forms when it is cold enough for water in the clouds to freeze.",
        "Wind is air that moves from one place to another.",
        "Weather forecasters use satellites and computers to predict the weather.",
        "Climate is the usual weather of a place over many years.",
    ],
    closers=["Knowing the weather helps us plan our day."],
)

TOPICS["climate change"] = dict(
    names=["climate change"],
    openers=["Climate change means that the Earth's climate is getting warmer over time.", "Climate change is one of the biggest challenges of our time."],
    body=[
        "Burning coal, oil and gas puts carbon dioxide into the air.",
        "Carbon dioxide traps heat, like a blanket around the Earth.",
        "A warmer climate can bring stronger storms, long droughts and rising seas.",
        "Ice at the poles is melting.",
        "Using clean energy from the sun and the wind can help.",
        "Planting trees, saving energy and using less plastic are small steps everyone can take.",
    ],
    closers=["If we work together, we can protect our planet for the future."],
)

TOPICS["math"] = dict(
    names=["math", "mathematics"],
    openers=["Math is the study of numbers, shapes and patterns.", "Mathematics is a language for describing the world."],
    body=[
        "We use math when we count money, cook, build houses and play games.",
        "Addition, subtraction, multiplication and division are the basic operations.",
        "Geometry is the part of math about shapes like triangles and circles.",
        "Computers are built on math.",
        "Math helps scientists describe how things move and change.",
        "Practice and curiosity are the keys to getting good at math.",
    ],
    closers=["Math is everywhere, once you learn to look for it."],
)

TOPICS["language models"] = dict(
    names=["language models", "a language model"],
    openers=[
        "A language model is a computer program that predicts the next word in a text.",
        "Language models are AI programs that learn to write by reading a lot of text.",
    ],
    body=[
        "They break text into small pieces called tokens.",
        "For each position, the model gives a probability to every possible next token.",
        "To write a sentence, the model picks a token, adds it to the text, and repeats.",
        "Greedy decoding always picks the most likely token.",
        "Sampling with a temperature picks tokens at random, so the answers are more varied.",
        "A higher temperature makes the text more surprising, and a lower one makes it more focused.",
        "An inference engine runs the model quickly and serves many requests at the same time.",
        "The model stores keys and values for earlier tokens in a KV cache so it does not compute them again.",
    ],
    closers=["That is how a language model turns a prompt into an answer, one token at a time."],
)

TOPICS["the meaning of life"] = dict(
    names=["the meaning of life"],
    openers=[
        "The meaning of life is a question that people have asked for thousands of years.",
        "The meaning of life is different for every person.",
        "The meaning of life is a big question, and there are many answers.",
    ],
    body=[],  # filled below from the thinkers
    closers=[
        "In the end, each of us must find our own answer.",
        "Perhaps the meaning of life is to keep asking the question.",
        "Many people say that love, learning and helping others give life its meaning.",
    ],
)

# What different thinkers said about the meaning of life, in simple words.
THINKERS = [
    ("Aristotle", "the meaning of life is to be happy by living well, using reason and being a good person",
     "Aristotle, a Greek philosopher, said that the goal of life is happiness, and that we become happy by living with virtue and using our reason."),
    ("Socrates", "the meaning of life is to seek wisdom and to know yourself",
     "Socrates said that an unexamined life is not worth living. For him, we should always ask questions and try to know ourselves."),
    ("Plato", "the meaning of life is to search for truth and goodness",
     "Plato believed that we should look beyond the world we see and search for truth, beauty and goodness."),
    ("Epicurus", "the meaning of life is a simple and peaceful life with good friends",
     "Epicurus taught that a good life is a calm and simple one, free from fear and pain, and shared with friends."),
    ("the Stoics", "the meaning of life is to live with virtue and to accept what we cannot control",
     "The Stoics, like Seneca, Epictetus and Marcus Aurelius, taught that we should live with virtue, stay calm, and accept the things we cannot change."),
    ("Confucius", "the meaning of life is to be kind, to respect your family and to live in harmony with others",
     "Confucius taught that a good life comes from kindness, respect for family, learning and living in harmony with other people."),
    ("the Buddha", "the meaning of life is to end suffering through wisdom and compassion",
     "The Buddha taught that life is full of suffering, and that we can end suffering by letting go of craving and living with wisdom and compassion."),
    ("Laozi", "the meaning of life is to live simply, in harmony with the natural way of things",
     "Laozi, the author of the Tao Te Ching, taught that we should live simply and follow the Tao, the natural way of the world."),
    ("Immanuel Kant", "the meaning of life is to do your duty and to treat every person with respect",
     "Immanuel Kant said that we should act only in ways that we could want everyone to act, and treat every person as valuable in themselves."),
    ("Friedrich Nietzsche", "the meaning of life is to create your own values and to say yes to life",
     "Friedrich Nietzsche believed that we must create our own values and become who we really are, saying yes to life even when it is hard."),
    ("Jean-Paul Sartre", "life has no meaning given in advance, so we create meaning through our choices",
     "Jean-Paul Sartre said that existence comes before essence: we are not born with a purpose, so we make our own meaning through our choices."),
    ("Albert Camus", "life may have no meaning, but we can still live fully and happily",
     "Albert Camus wrote that life can seem absurd, but we should not give up. He said that we must imagine Sisyphus happy."),
    ("Viktor Frankl", "the meaning of life is found in love, in work and in courage in hard times",
     "Viktor Frankl, who survived terrible camps, wrote that we can find meaning in our work, in love, and in the courage we show when we suffer."),
    ("Simone de Beauvoir", "the meaning of life is to live freely and to help others be free",
     "Simone de Beauvoir wrote that we give our lives meaning when we use our freedom and help other people become free too."),
    ("many religions", "the meaning of life is to love God and to love other people",
     "Many religions teach that the meaning of life is to love God, to love other people, and to live a good and honest life."),
    ("many scientists", "we are part of a huge universe, and we can find meaning in understanding it",
     "Many scientists feel that we are part of a huge and beautiful universe, and that trying to understand it gives life meaning."),
    ("Douglas Adams", "the answer to life, the universe and everything is 42",
     "In a funny novel by Douglas Adams, a giant computer thinks for millions of years and says that the answer to life, the universe and everything is 42."),
]
TOPICS["the meaning of life"]["body"] = [t[2] for t in THINKERS] + [
    "Some people find meaning in their family and friends.",
    "Others find meaning in their work, in art, or in helping their community.",
    "Some people say the meaning of life is simply to be happy and to make others happy.",
]

# Short answers to "What is the meaning of life?".
MEANING_ANSWERS = [
    "There is no single answer. Many people say the meaning of life is to love, to learn and to help others.",
    "Different thinkers give different answers. Aristotle said it is happiness through living well, and the Buddha said it is to end suffering.",
    "The meaning of life is different for every person. Many find it in family, friendship and doing good work.",
    "Philosophers have argued about this for thousands of years. Some say we must create our own meaning through our choices.",
    "Many people believe the meaning of life is to be happy, to be kind and to leave the world a little better than we found it.",
    "According to a famous joke by Douglas Adams, the answer is 42. More seriously, many people find meaning in love and in helping others.",
    "For Aristotle, the meaning of life is happiness, which comes from living with virtue and reason.",
    "For the Stoics, the meaning of life is to live with virtue and accept what we cannot control.",
    "For the Buddha, the meaning of life is to end suffering through wisdom and compassion.",
    "For Sartre, life has no meaning given in advance, so each person creates their own meaning.",
    "For Camus, life may be absurd, but we can still live it fully and happily.",
    "Viktor Frankl said that we find meaning in love, in our work and in courage during hard times.",
    "Confucius taught that a meaningful life is one of kindness, learning and respect for others.",
    "Epicurus said that a good life is a simple, peaceful life with good friends.",
]

# Short questions and answers about the explanation topics.
TOPIC_QA = [
    ("What is AI?", "AI, or artificial intelligence, is the science of making computers that can learn, reason and solve problems."),
    ("What is artificial intelligence?", "Artificial intelligence is the field of making computers do things that usually need human intelligence, like understanding language."),
    ("What is machine learning?", "Machine learning is a part of AI where computers learn patterns from examples instead of following fixed rules."),
    ("What is a language model?", "A language model is a program that predicts the next word, or token, in a text."),
    ("What is quantum computing?", "Quantum computing is a new kind of computing that uses qubits, which can be 0 and 1 at the same time."),
    ("What is a qubit?", "A qubit is the basic unit of a quantum computer. Unlike a normal bit, it can be in a mix of 0 and 1."),
    ("What is the best way to learn programming?", "The best way to learn programming is to practice every day by building small projects that you care about."),
    ("How do I learn to code?", "Start with a simple language like Python, write small programs every day, and build projects that interest you."),
    ("What is the future of AI?", "The future of AI is bright: it will help in medicine, science and education, but we must make it safe and fair."),
    ("What is the internet?", "The internet is a huge network that connects computers and phones all over the world."),
    ("What is a computer?", "A computer is a machine that follows instructions to store and process information."),
    ("What is a robot?", "A robot is a machine that can sense the world around it and move and act on its own."),
    ("What is a GPU?", "A GPU is a chip that can do many calculations at the same time. It is used for games and for AI."),
    ("What is Python?", "Python is a popular programming language that is easy to read and good for beginners."),
    ("What is a neural network?", "A neural network is a kind of machine learning model made of many small connected units, loosely inspired by the brain."),
    ("What is a token?", "A token is a small piece of text, like a word or part of a word, that a language model reads and writes."),
    ("What is gravity?", "Gravity is the force that pulls objects toward each other. It keeps us on the ground."),
    ("What is electricity?", "Electricity is a kind of energy made by moving electrons. It powers our lights and machines."),
    ("What is climate change?", "Climate change is the slow warming of the Earth, caused mostly by burning coal, oil and gas."),
]

# Explain-in-simple-terms targets (topic key in TOPICS).
EXPLAIN_TOPICS = [
    "quantum computing", "AI", "machine learning", "the internet", "computers", "gravity",
    "electricity", "plants", "the Sun", "the Moon", "climate change", "language models",
    "robots", "space", "the weather", "the meaning of life", "programming", "the future of AI",
]
