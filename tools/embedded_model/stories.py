"""Short children's stories from plot templates and word lists (see wordlists.py).

Each story: an opening ("Once upon a time, ..."), a main character and a friend,
a place, one event with a problem, feelings, a resolution, and an ending.
"""
from wordlists import (ANIMALS, PEOPLE, FEMALE_PEOPLE, MALE_PEOPLE, CHAR_ADJ, PLACES, FAMILY,
                       HOBBIES, OBJECTS, FOODS, GOOD_FEELINGS, BAD_FEELINGS, WEATHER, LESSONS,
                       GIRL_NAMES, BOY_NAMES)

PRON = {
    "f": dict(he="she", him="her", his="her", He="She", His="Her", himself="herself"),
    "m": dict(he="he", him="him", his="his", He="He", His="His", himself="himself"),
}


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def make_character(rng, exclude=()):
    if rng.random() < 0.5:
        noun, _ = rng.choice(ANIMALS)
        g = rng.choice("fm")
    else:
        noun = rng.choice(PEOPLE)
        g = "f" if noun in FEMALE_PEOPLE else "m" if noun in MALE_PEOPLE else rng.choice("fm")
    while True:
        name = rng.choice(GIRL_NAMES if g == "f" else BOY_NAMES)
        if name not in exclude:
            break
    adj = rng.choice(CHAR_ADJ)
    desc = f"{_article(adj)} {adj} {noun} named {name}"
    c = dict(name=name, noun=noun, adj=adj, desc=desc, short=f"the {adj} {noun}")
    c.update(PRON[g])
    return c


def fill(template, A, B, ctx):
    d = dict(ctx)
    d.update({"A": A["name"], "B": B["name"]})
    for k in ("he", "him", "his", "He", "His", "himself", "noun", "desc", "short", "adj"):
        d[k] = A[k]
        d["b" + k] = B[k]
        d["B" + k] = B[k][:1].upper() + B[k][1:]
    return template.format(**d)


def opening(rng, A, ctx):
    r = rng.random()
    place = ctx["place"]
    if r < 0.30:
        s = f"Once upon a time, in {place}, there lived {A['desc']}."
    elif r < 0.50:
        s = f"Once upon a time, there was {A['desc']} who lived in {place}."
    elif r < 0.62:
        s = f"Once upon a time in {place}, {A['desc']} lived with {A['his']} {ctx['family']}."
    elif r < 0.74:
        s = f"Once upon a time, {A['desc']} lived in {place}."
    elif r < 0.84:
        s = f"Once upon a time, in {place}, there was {A['desc']}."
    elif r < 0.90:
        s = f"Once upon a time, there lived {A['desc']} in {place}."
    elif r < 0.95:
        s = f"Long ago, in {place}, there lived {A['desc']}."
    else:
        s = f"One day, in {place}, {A['desc']} woke up early."
    return s


def trait(rng, A, ctx):
    return rng.choice([
        f"{A['He']} loved to {ctx['hobby']}.",
        f"Every day, {A['name']} liked to {ctx['hobby']}.",
        f"{A['name']} was {A['adj']}, and {A['he']} loved to {ctx['hobby']}.",
        f"More than anything, {A['name']} loved to {ctx['hobby']}.",
        f"{A['He']} spent {A['his']} days trying to {ctx['hobby']}.",
    ])


def friend_intro(rng, A, B):
    return rng.choice([
        f"{A['His']} best friend was {B['desc']}.",
        f"{A['name']} had a friend, {B['desc']}.",
        f"Not far away lived {B['desc']}.",
        f"{A['He']} often played with {B['desc']}.",
    ])


# Each plot: list of sentence slots; each slot is a list of variants.
PLOTS = [
    [  # lost object
        ["One day, {A} lost {obj}.", "One morning, {A} could not find {his} {objs}.", "One day, {his} {objs} was gone."],
        ["{He} looked under the bed, behind the door and in the garden, but {objt} was nowhere.", "{He} searched everywhere, but {he} could not find it."],
        ["{A} felt {bad}.", "{A} sat down and began to cry.", "{He} was very {bad}."],
        ["Then {B} came by and said, \"Don't worry, I will help you.\"", "{B} saw {him} and offered to help."],
        ["Together they looked by the river and in the old barn.", "They searched the whole {where} together."],
        ["At last, {B} found {objt} under a pile of leaves.", "Suddenly, {A} saw {objt} shining in the grass.", "Finally, they found {objt} in a bird's nest."],
        ["{A} was so {good} that {he} hugged {B}.", "{A} smiled and thanked {B} again and again.", "{A} felt {good} again."],
    ],
    [  # storm
        ["{weather} Then dark clouds filled the sky.", "One evening, a big storm came to the {where}."],
        ["The wind howled and the rain fell hard.", "Thunder boomed and the trees shook."],
        ["{B}'s little house was broken by the wind.", "{B} had no place to stay dry."],
        ["{A} felt {bad}, but {he} knew what to do.", "Even though {he} was scared, {A} ran out to help."],
        ["{He} invited {B} into {his} warm home.", "{He} shared {his} blanket and some hot {food} with {B}."],
        ["They listened to the storm together and told stories until they fell asleep.", "They sat by the fire and sang songs until the storm was over."],
        ["In the morning, the sun came out, and they fixed {B}'s house together.", "The next day, the sky was blue, and everyone helped to fix the damage."],
    ],
    [  # new friend
        ["But {A} was often lonely, because {he} had no friends.", "{A} was shy, and {he} often played alone."],
        ["One day, a new family moved into the house next door.", "One day, {A} saw {B} sitting alone by the pond."],
        ["{B} looked {bad} too.", "{B} did not know anyone in the {where}."],
        ["{A} took a deep breath and said, \"Hello! Do you want to play with me?\"", "{A} walked over and said hello."],
        ["{B} smiled, and they played all afternoon.", "They laughed, ran and played games until the sun went down."],
        ["From that day on, {A} and {B} were the best of friends.", "Soon they were the best of friends, and {A} was never lonely again."],
    ],
    [  # race
        ["One spring, there was a big race in the {where}.", "One day, the animals of the {where} decided to have a race."],
        ["{A} wanted to win more than anything.", "{A} practiced every morning."],
        ["On the day of the race, everyone cheered.", "When the race began, {A} ran as fast as {he} could."],
        ["Near the end, {B} fell down and hurt {bhis} leg.", "Halfway through, {A} saw {B} fall into the mud."],
        ["{A} stopped and helped {B} get up.", "{A} did not run past. {He} stopped to help {his} friend."],
        ["They crossed the finish line together, last of all.", "They walked to the finish line side by side."],
        ["{A} did not win, but everyone clapped the loudest for {him}.", "Nobody remembered who won, but everyone remembered how kind {A} had been."],
    ],
    [  # hungry winter
        ["Winter came, and the {where} was covered in snow.", "One year, the winter was long and very cold."],
        ["{B} had no food left and was very hungry.", "{B} knocked on {A}'s door. {Bhe} was cold and hungry."],
        ["{A} did not have much, but {he} shared {his} {food} with {B}.", "{A} gave {B} half of all {his} {food}."],
        ["They ate together by the fire and felt {good}.", "The two friends stayed warm together all winter."],
        ["When spring came, {B} brought {A} a basket full of {food2}.", "In the spring, {B} came back with a big basket of {food2} to say thank you."],
        ["{A} learned that kindness always comes back.", "They both learned that sharing makes everyone richer."],
    ],
    [  # magic seed
        ["One day, {A} found a tiny, shining seed on the path.", "One morning, an old woman gave {A} a magic seed."],
        ["{He} planted it in the garden and watered it every day.", "{A} put the seed in the ground and waited."],
        ["At first, nothing happened, and {A} felt {bad}.", "For many days, nothing grew."],
        ["But one morning, there was a huge tree full of sweet {food2}!", "Then, one night, the seed grew into a giant tree that touched the clouds."],
        ["{A} called {B} and all the neighbors to share the fruit.", "{A} shared the fruit with {B} and everyone in the {where}."],
        ["Nobody in the {where} was ever hungry again.", "Everyone had a wonderful feast under the tree."],
    ],
    [  # lost in the forest
        ["One day, {A} went into the forest to pick berries.", "One afternoon, {A} followed a butterfly deep into the woods."],
        ["Soon the sun went down, and {A} did not know the way home.", "When {he} looked around, {he} was lost."],
        ["It was dark, and {A} felt {bad}.", "{A} heard strange noises and began to shiver."],
        ["Then {B} appeared with a little lantern.", "Just then, {B} flew down from a tall tree."],
        ["\"Follow me,\" said {B}. \"I know the way.\"", "{B} said, \"Don't be afraid. Just follow the stars.\""],
        ["They walked together until they saw the lights of home.", "Step by step, they found the path back home."],
        ["{A}'s {family} hugged {him} tightly, and {A} promised to be more careful.", "{A} was safe at home, and {he} thanked {B} with all {his} heart."],
    ],
    [  # dragon / scary creature
        ["People said that a scary dragon lived in a cave on the mountain.", "Everyone in the {where} was afraid of the big cave on the hill."],
        ["But {A} was curious, so {he} climbed up to see.", "One day, {A} decided to find out the truth."],
        ["Inside the cave, {he} found a small dragon crying.", "In the cave, there was a dragon, but it was not scary at all. It was sad."],
        ["\"Why are you crying?\" asked {A}. \"Because nobody wants to be my friend,\" said the dragon.", "The dragon had hurt its wing and could not fly."],
        ["{A} helped the dragon and brought it some {food}.", "{A} stayed with the dragon and took care of it."],
        ["Soon the whole {where} learned that the dragon was kind.", "After that, the dragon gave children rides over the hills."],
        ["The dragon and {A} were friends forever.", "Nobody was afraid of the dragon ever again."],
    ],
    [  # rescue
        ["One day, {A} and {B} went to play by the river.", "One sunny day, {B} climbed a very tall tree."],
        ["Suddenly, {B} slipped and could not get back.", "Suddenly, {B} was stuck and called for help."],
        ["{A} felt {bad}, but {he} knew {he} had to be brave.", "{A}'s heart was beating fast."],
        ["{He} found a long rope and threw it to {B}.", "{He} ran to get help and came back with a ladder."],
        ["With all {his} strength, {A} pulled {B} to safety.", "Slowly and carefully, {B} came down."],
        ["\"You saved me!\" said {B}.", "{B} hugged {A} and said thank you."],
        ["Everyone said that {A} was the bravest {noun} in the {where}.", "That day, {A} learned that {he} was braver than {he} thought."],
    ],
    [  # birthday gift
        ["Tomorrow was {B}'s birthday.", "{B}'s birthday was coming soon."],
        ["{A} wanted to give {bhim} a present, but {he} had no money.", "{A} wanted a special gift for {B}, but {he} did not know what to give."],
        ["{A} felt {bad} and thought for a long time.", "{He} thought and thought."],
        ["Then {he} had an idea: {he} would make something by hand.", "At last, {he} had a wonderful idea."],
        ["{He} painted a picture of the two friends together.", "{He} baked a small cake with {food2} on top.", "{He} wrote a song just for {B}."],
        ["When {B} saw the gift, {bhe} smiled from ear to ear.", "{B} said it was the best present {bhe} had ever received."],
        ["{A} learned that the best gifts come from the heart.", "It was the happiest birthday ever."],
    ],
    [  # learning a skill
        ["{A} wanted to learn to {skill}.", "More than anything, {A} wished {he} could {skill}."],
        ["But it was very hard, and at first {he} failed again and again.", "The first time {he} tried, it went very badly."],
        ["{He} felt {bad} and wanted to give up.", "Some days, {A} felt like giving up."],
        ["{B} said, \"Keep trying a little every day. You will get there.\"", "{B} told {him} that everyone starts as a beginner."],
        ["So {A} practiced every single day.", "{A} kept trying, day after day."],
        ["At last, one morning, {he} could {skill}!", "One day, to {his} surprise, {he} could finally {skill}."],
        ["{A} felt so {good}.", "{A} was very {good}, and {B} cheered for {him}."],
    ],
    [  # honesty
        ["One day, {A} was playing ball inside the house.", "One afternoon, {A} was running around in the kitchen."],
        ["Crash! {He} broke {his} {family}'s favorite vase.", "Suddenly, {he} knocked over a big jar, and it broke into pieces."],
        ["{A} felt {bad}. {He} thought about hiding the pieces.", "{A} was afraid that {he} would get in trouble."],
        ["But {he} remembered what {B} always said: \"The truth is always best.\"", "Then {he} decided to be honest."],
        ["{He} told {his} {family} what had happened and said sorry.", "{A} said, \"I am sorry. It was me.\""],
        ["{His} {family} hugged {him} and said, \"Thank you for telling the truth.\"", "{His} {family} was not angry. They fixed it together."],
        ["{A} felt light and {good} again.", "From then on, {A} always told the truth."],
    ],
    [  # treasure map
        ["One day, {A} and {B} found an old map in the attic.", "One rainy day, {A} found an old map inside a book."],
        ["The map showed a big X next to the old oak tree.", "It showed the way to a hidden treasure."],
        ["The two friends packed some {food} and set off.", "They followed the map over the hill and across the stream."],
        ["At the old tree, they dug and dug.", "At last, they found a wooden box under the roots."],
        ["Inside the box, there was no gold, only a note that said: \"The real treasure is a good friend.\"", "In the box, they found old photos and letters from children who had lived there long ago."],
        ["{A} and {B} laughed, because they knew it was true.", "They decided it was the best treasure of all."],
    ],
    [  # trip / dream
        ["{A} had always dreamed of seeing the sea.", "{A} dreamed of seeing the tall mountains far away."],
        ["One day, {he} packed a small bag and set off with {B}.", "One summer, {A} and {B} decided to go on a trip."],
        ["They walked for many days and slept under the stars.", "The road was long, and sometimes they felt {bad}."],
        ["They met many kind people on the way.", "They crossed rivers, fields and forests."],
        ["At last, they saw it, big and beautiful in the morning light.", "At last, they reached the top and looked at the whole world below."],
        ["{A} felt {good} and very {good2}.", "{A} smiled. It was even more beautiful than in {his} dreams."],
        ["Then they went home, full of stories to tell.", "When they came home, they told everyone about their great adventure."],
    ],
    [  # inventor robot
        ["{A} liked to build machines in {his} little workshop.", "{A} loved to build things with old metal and wires."],
        ["One day, {he} built a small robot and named it Bolt.", "One day, {A} built a robot to help {him} with chores."],
        ["At first, the robot made many mistakes. It put the milk in the oven!", "At first, the robot could not even walk straight."],
        ["{A} did not give up. {He} fixed it and taught it a little more every day.", "{A} worked day and night to make it better."],
        ["Soon, the robot could water the garden and help {B} carry heavy bags.", "Soon, the robot was helping everyone in the {where}."],
        ["Everyone in the {where} loved the little robot.", "{A} was very {good} of {his} robot."],
    ],
    [  # fallen star
        ["One night, a little star fell from the sky and landed near {A}'s house.", "One night, {A} saw a tiny star lying in the grass."],
        ["The star was crying, because it wanted to go home.", "\"I fell down,\" said the star, \"and I cannot get back to the sky.\""],
        ["{A} felt sorry for the star and wanted to help.", "{A} asked {B} for help."],
        ["They climbed to the top of the highest hill.", "{B} knew a very tall tree that touched the clouds."],
        ["With a big push, they sent the star back up into the sky.", "{A} lifted the star as high as {he} could, and it flew up."],
        ["Now, every night, the star shines a little brighter over {A}'s house.", "Every night after that, the star twinkled to say thank you."],
    ],
]

SKILLS = ["swim", "read", "ride a bike", "play the flute", "whistle", "fly", "bake bread",
          "climb the big tree", "draw a horse", "sing a song", "write a poem", "jump over the fence"]

WHERE = ["village", "town", "forest", "kingdom", "valley", "city"]


def ending(rng, A, B, ctx):
    r = rng.random()
    if r < 0.25:
        return "The end."
    if r < 0.40:
        return "And they lived happily ever after."
    if r < 0.55:
        return f"{A['name']} learned that {ctx['lesson']}."
    if r < 0.68:
        return f"From that day on, {A['name']} and {B['name']} were the best of friends."
    if r < 0.78:
        return f"{A['name']} learned that {ctx['lesson']}. The end."
    if r < 0.88:
        return f"And {A['name']} never forgot that day."
    return f"That night, {A['name']} went to bed {rng.choice(GOOD_FEELINGS)}, with a big smile."


def story(rng):
    A = make_character(rng)
    B = make_character(rng, exclude=(A["name"],))
    obj, objt = rng.choice(OBJECTS)
    ctx = dict(
        place=rng.choice(PLACES), family=rng.choice(FAMILY[:6] + ["mother", "father"]),
        hobby=rng.choice(HOBBIES), obj=obj, objs=obj.split(" ", 1)[1], objt=objt,
        food=rng.choice(FOODS), food2=rng.choice(FOODS), good=rng.choice(GOOD_FEELINGS),
        good2=rng.choice([f for f in GOOD_FEELINGS if f != "brave"]), bad=rng.choice(BAD_FEELINGS), weather=rng.choice(WEATHER),
        lesson=rng.choice(LESSONS), skill=rng.choice(SKILLS), where=rng.choice(WHERE),
    )
    sents = [opening(rng, A, ctx)]
    if rng.random() < 0.7:
        sents.append(trait(rng, A, ctx))
    if rng.random() < 0.6:
        sents.append(friend_intro(rng, A, B))
    plot = rng.choice(PLOTS)
    body = []
    for slot in plot:
        body.append(fill(rng.choice(slot), A, B, ctx))
    sents += body
    sents.append(ending(rng, A, B, ctx))
    # One or two paragraphs.
    if rng.random() < 0.35 and len(sents) > 6:
        k = len(sents) // 2
        return " ".join(sents[:k]) + "\n\n" + " ".join(sents[k:])
    return " ".join(sents)
