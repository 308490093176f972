"""Meta-training samples shaped like what `absorb` and `chat` really see: synthetic users who talk.

A synthetic user has a profile of open-vocabulary facts (values from `Faker` and combinatorial pools,
thousands per attribute, so that no value can be memorised as one of a few), in training about half of
them of open attributes (`OPEN_ATTRIBUTES`: three families of phrasings over many things, so that the
kinds of fact are not a closed list either). The user tells them over
several sessions, in many phrasings, between real chit-chat lines from MSC dialogues, sometimes
several in one introduction, sometimes in passing, and sometimes changes one later (a knowledge
update). Sessions become memories exactly as `D2LMemory.absorb_messages` makes them
(`transcripts.transcript_turns` + `segment_turns`, with every role or the user's turns only), tool
results exactly as `render_tool_output` renders them, and needles of many kinds are hidden in essay
filler. A question asks, the way a user asks, for one value; the other memories of the same user ride
along as distractors that the student's adapter composes with the relevant one (`Sample.memories`,
weighted as `D2LMemory.prepare` weights them).

Held out for evaluation, never drawn by `split="train"`: every fourth phrasing of each statement and
question family, whole attributes (`HELD_OUT_ATTRIBUTES`), values whose hash falls in the eval bucket
(`is_eval_value`), and the MSC test file's lines. `leaks()` checks a training set against all four.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal

from faker import Faker

from d2l_memory.training.data import Sample, bury, shared_data
from d2l_memory.transcripts import render_tool_output, segment_turns, transcript_turns

Split = Literal["train", "eval"]
LOCALES = ["en_US", "en_GB", "en_AU", "en_IE", "de_DE", "fr_FR", "es_ES", "it_IT", "pt_BR", "nl_NL",
           "pl_PL", "sv_SE", "da_DK", "cs_CZ", "tr_TR", "fi_FI"]
INGREDIENTS = ["mushroom", "pumpkin", "lamb", "shrimp", "tofu", "spinach", "chicken", "beef", "salmon",
               "lentil", "chickpea", "eggplant", "duck", "pork", "goat cheese", "crab", "walnut", "truffle",
               "sweet potato", "cauliflower", "octopus", "coconut", "mango", "pistachio", "black bean",
               "halloumi", "leek", "fennel", "squid", "venison", "apricot", "miso", "kimchi", "basil",
               "lemon", "ginger", "sesame", "chorizo", "saffron", "blueberry"]
DISHES = ["risotto", "curry", "tacos", "ramen", "pie", "dumplings", "stew", "lasagna", "burrito", "salad",
          "soup", "pizza", "noodles", "gelato", "tart", "pancakes", "skewers", "paella", "sandwich", "bao",
          "gnocchi", "empanadas", "omelette", "pho", "quiche", "falafel wrap", "burger", "ravioli"]
ANIMALS = ["cat", "dog", "parrot", "hamster", "rabbit", "tortoise", "ferret", "iguana", "goldfish", "gecko",
           "cockatiel", "guinea pig", "chinchilla", "hedgehog", "corn snake", "budgie", "axolotl", "pony"]
ACTIVITIES = ["rock climbing", "pottery", "salsa dancing", "birdwatching", "woodworking", "sailing",
              "knitting", "chess", "surfing", "fencing", "archery", "origami", "beekeeping", "kayaking",
              "calligraphy", "gardening", "bouldering", "judo", "baking sourdough", "astronomy", "cycling",
              "trail running", "photography", "embroidery", "skateboarding", "painting watercolors",
              "playing the cello", "playing the banjo", "playing the trumpet", "playing the harp",
              "playing squash", "playing badminton", "playing water polo", "playing rugby", "fly fishing"]
DRINKS = ["oat latte", "jasmine tea", "espresso", "matcha", "ginger beer", "chai", "flat white", "cold brew",
          "hot chocolate", "rooibos", "lemonade", "kombucha", "mint tea", "cortado", "iced americano"]
MAKES = ["Toyota", "Volvo", "Fiat", "Skoda", "Honda", "Subaru", "Kia", "Renault", "Mazda", "Peugeot", "Tesla",
         "Ford", "Nissan", "Hyundai", "Seat", "Opel"]
MODELS = ["Corolla", "XC40", "Panda", "Octavia", "Civic", "Outback", "Niro", "Clio", "CX-5", "208", "Model 3",
          "Focus", "Leaf", "Kona", "Ibiza", "Astra", "Golf", "Yaris", "Polo", "Prius"]


@cache
def _faker(locale: str) -> Faker:
    f = Faker(locale)
    # Some locales (it_IT) build their city list from a set, whose order changes with each process's string
    # hashing: sorted, one seed draws the same city in every process, so data and evaluation are reproducible.
    for provider in f.providers:
        if isinstance(getattr(provider, "cities", None), list):
            provider.cities = sorted(provider.cities)
    return f


def _fake(rng: random.Random, latin: bool = True) -> Faker:
    f = _faker(rng.choice(LOCALES) if latin else "en_US")
    f.seed_instance(rng.getrandbits(32))
    return f


def _date(rng: random.Random) -> str:
    months = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
              "October", "November", "December"]
    return f"{months[rng.randrange(12)]} {rng.randint(1, 28)}"


def _code(rng: random.Random) -> str:
    shapes = ["####", "#####", "??-####", "###-###", "?#?#?#", "####-??", "??###"]
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    return "".join(str(rng.randrange(10)) if c == "#" else rng.choice(letters) if c == "?" else c
                   for c in rng.choice(shapes))


# Value generators: each draws from a pool of thousands (Faker across 16 locales, or combinations).
VALUES: dict[str, Callable[[random.Random], str]] = {
    "name": lambda r: _fake(r).first_name(),
    "full_name": lambda r: _fake(r).name(),
    "city": lambda r: _fake(r).city(),
    "country": lambda r: _fake(r, latin=False).country(),
    "job": lambda r: _fake(r, latin=False).job().split(",")[0].lower(),
    "company": lambda r: _fake(r).company(),
    "hotel": lambda r: f"{_fake(r).company()} Hotel",
    "street": lambda r: _fake(r).street_name(),
    "color": lambda r: _fake(r, latin=False).color_name().lower(),
    "food": lambda r: f"{r.choice(INGREDIENTS)} {r.choice(DISHES)}",
    "animal": lambda r: r.choice(ANIMALS),
    "activity": lambda r: r.choice(ACTIVITIES),
    "drink": lambda r: r.choice(DRINKS),
    "car": lambda r: f"{r.choice(MAKES)} {r.choice(MODELS)}",
    "date": _date,
    "code": _code,
    "number": lambda r: str(r.randint(2, 97)),
    "room": lambda r: str(r.randint(100, 999)),
    "plate": lambda r: _fake(r).license_plate(),
    "title": lambda r: _fake(r, latin=False).catch_phrase().title(),
    "phrase": lambda r: " ".join(w.capitalize() for w in _fake(r, latin=False).words(r.randint(1, 3))),
}


def is_eval_value(value: str) -> bool:
    """One value in eight (by a hash of its normalised text) is kept for evaluation only."""
    return hashlib.sha1(value.strip().lower().encode()).digest()[0] % 8 == 0


def draw_value(kind: str, rng: random.Random, split: Split) -> str:
    """A value of `kind` from the split's part of its pool: training never draws an eval value. The short
    closed pools (animals, drinks, activities) may have no eval value at all; evaluation then reuses
    training values there, so those cases test new wording only."""
    value = ""
    for _ in range(200):
        value = VALUES[kind](rng).strip()
        if value and is_eval_value(value) == (split == "eval"):
            return value
    if split == "eval" and value:
        return value
    raise RuntimeError(f"could not draw a {split} value of kind {kind}")


@dataclass(frozen=True)
class Attribute:
    """One thing a user can tell: first-person statements, update statements, second-person questions,
    third-person forms for notes, and the reference answers (`{v}` the value, `{n}` the person)."""

    key: str
    kind: str
    tell: tuple[str, ...]
    ask: tuple[str, ...]
    answer: str
    note: tuple[str, ...]
    ask_about: tuple[str, ...]
    change: tuple[str, ...] = ()


A = Attribute
ATTRIBUTES: tuple[Attribute, ...] = (
    A("city", "city", ("I live in {v}.", "I'm based in {v}.", "Home for me is {v} these days.",
                       "I've been living in {v} for a few years now.", "We just settled in {v}.",
                       "My flat is in {v}.", "I'm writing from {v}, where I live.", "I call {v} home."),
      ("Where do I live?", "Which city do I live in?", "Remind me, where am I based?", "Where's home for me?",
       "Do you remember what city I live in?", "In which town do I live?", "Where am I living these days?",
       "What city did I say I live in?"),
      "You live in {v}.",
      ("{n} lives in {v}.", "{n} is based in {v}.", "{n}'s home is in {v}.", "{n} has a flat in {v}."),
      ("Where does {n} live?", "Which city is {n} based in?", "Where is {n}'s home?", "In what city does {n} live?"),
      ("I moved to {v} last month.", "I've relocated to {v} now.", "We moved again, I live in {v} now.",
       "Big news: I now live in {v}.")),
    A("job", "job", ("I work as a {v}.", "I'm a {v} by trade.", "My job? I'm a {v}.", "I earn my living as a {v}.",
                     "During the week I work as a {v}.", "I've been a {v} for ten years.",
                     "Professionally, I'm a {v}.", "I trained as a {v} and that's still my job."),
      ("What do I do for a living?", "What is my job?", "Remind me what my profession is.",
       "What's my line of work?", "Do you remember my job?", "What kind of work do I do?",
       "How do I earn my living?", "What did I say my occupation is?"),
      "You work as a {v}.",
      ("{n} works as a {v}.", "{n} is a {v}.", "By profession, {n} is a {v}.", "{n}'s job: {v}."),
      ("What does {n} do for a living?", "What is {n}'s job?", "What is {n}'s profession?",
       "What work does {n} do?"),
      ("I changed careers, I'm a {v} now.", "I started a new job as a {v}.", "These days I work as a {v}.",
       "I quit my old job; now I'm a {v}.")),
    A("employer", "company", ("I work at {v}.", "My employer is {v}.", "I'm on the team at {v}.",
                              "I got hired by {v} last year.", "My office is at {v}.",
                              "I've been with {v} since spring.", "I draw my paycheck from {v}.",
                              "I do my nine-to-five at {v}."),
      ("Which company do I work for?", "Who is my employer?", "Where do I work?", "What's the name of my company?",
       "Remind me who I work for.", "Do you remember my employer?", "What firm am I with?",
       "Which company hired me?"),
      "You work at {v}.",
      ("{n} works at {v}.", "{n} is employed by {v}.", "{n}'s employer is {v}.", "{n} is on staff at {v}."),
      ("Which company does {n} work for?", "Who employs {n}?", "Where does {n} work?", "What is {n}'s employer?"),
      ("I switched jobs, I'm at {v} now.", "I joined {v} this week.", "My new employer is {v}.",
       "I left for {v} last month.")),
    A("color", "color", ("My favorite color is {v}.", "I love the color {v}.", "{v} is my favourite colour.",
                         "I paint everything {v}, it's my favorite color.", "The color I like most is {v}.",
                         "If I had to pick a color, it'd be {v}.", "Nothing beats {v} for me, color-wise.",
                         "I'm obsessed with the colour {v}."),
      ("What is my favorite color?", "Which colour do I like best?", "Remind me of my favourite colour.",
       "What color do I love?", "Do you remember my favorite color?", "What colour did I say I like most?",
       "Which color would I pick?", "Can you tell me my favorite color?"),
      "Your favorite color is {v}.",
      ("{n}'s favorite color is {v}.", "{n} loves the color {v}.", "The color {n} likes most is {v}.",
       "{n}'s favourite colour: {v}."),
      ("What is {n}'s favorite color?", "Which color does {n} like best?", "What colour does {n} love?",
       "What is {n}'s favourite colour?"),
      ("My favorite color is {v} now.", "These days I prefer {v} as a color.", "I've switched: {v} is my color now.",
       "Honestly my favorite color has become {v}.")),
    A("food", "food", ("My favorite food is {v}.", "I could eat {v} every day.", "Nothing beats {v} for dinner.",
                       "I'm crazy about {v}.", "My comfort food is {v}.", "I always order the {v}.",
                       "The dish I love most is {v}.", "Give me {v} and I'm happy."),
      ("What is my favorite food?", "What dish do I love most?", "What's my comfort food?",
       "What do I always order?", "Remind me what food I love.", "Do you remember my favorite dish?",
       "Which meal could I eat every day?", "What food did I say I'm crazy about?"),
      "Your favorite food is {v}.",
      ("{n}'s favorite food is {v}.", "{n} loves {v}.", "{n} always orders the {v}.", "{n}'s comfort food: {v}."),
      ("What is {n}'s favorite food?", "What dish does {n} love?", "What does {n} always order?",
       "What is {n}'s comfort food?"),
      ("Lately my favorite food is {v}.", "I've gone off it, now I love {v}.", "My new favorite dish is {v}.",
       "These days I'd pick {v} over anything.")),
    A("pet", "name", ("My dog is called {v}.", "I have a dog named {v}.", "{v}, my dog, is the best.",
                      "My pup {v} keeps me busy.", "We adopted a dog and named him {v}.",
                      "I walk my dog {v} every morning.", "My dog's name is {v}.", "Our dog {v} turned three."),
      ("What is my dog's name?", "What did I name my dog?", "What's my dog called?", "Remind me of my dog's name.",
       "Do you remember my dog's name?", "Who is my dog?", "What do I call my dog?",
       "What name does my dog have?"),
      "Your dog is called {v}.",
      ("{n} has a dog named {v}.", "{n}'s dog is called {v}.", "{n} walks a dog named {v}.",
       "{n}'s dog: {v}."),
      ("What is the name of {n}'s dog?", "What is {n}'s dog called?", "What did {n} name the dog?",
       "Who is {n}'s dog?")),
    A("pet_kind", "animal", ("I have a pet {v}.", "My pet is a {v}.", "I share my flat with a {v}.",
                             "I've got a {v} at home.", "My little {v} is my only pet.", "I look after a pet {v}.",
                             "At home I keep a {v}.", "I adopted a {v} last year."),
      ("What kind of pet do I have?", "What animal do I keep at home?", "What's my pet?",
       "Remind me what pet I have.", "Do you remember my pet?", "Which animal lives with me?",
       "What sort of animal is my pet?", "What pet did I say I have?"),
      "You have a pet {v}.",
      ("{n} has a pet {v}.", "{n} keeps a {v}.", "{n}'s pet is a {v}.", "{n} owns a {v}."),
      ("What kind of pet does {n} have?", "What animal does {n} keep?", "What is {n}'s pet?",
       "Which pet does {n} own?")),
    A("hobby", "activity", ("My hobby is {v}.", "In my free time I love {v}.", "I spend my weekends {v}.",
                            "I got really into {v} this year.", "My favourite pastime is {v}.",
                            "You'll find me {v} most Saturdays.", "I unwind by {v}.", "My passion is {v}."),
      ("What is my hobby?", "What do I do in my free time?", "How do I spend my weekends?",
       "What's my favourite pastime?", "Remind me what I do to unwind.", "Do you remember my hobby?",
       "What did I get into this year?", "What do I do on Saturdays?"),
      "Your hobby is {v}.",
      ("{n}'s hobby is {v}.", "{n} loves {v}.", "In free time, {n} enjoys {v}.", "{n} spends weekends {v}."),
      ("What is {n}'s hobby?", "What does {n} do for fun?", "How does {n} spend weekends?",
       "What pastime does {n} enjoy?"),
      ("I picked up a new hobby: {v}.", "Now my hobby is {v}.", "I've switched to {v} on weekends.",
       "These days I'm all about {v}.")),
    A("sibling", "name", ("My sister is called {v}.", "I have a sister named {v}.", "My older sister {v} visited.",
                          "{v}, my sister, lives nearby.", "I talked to my sister {v} today.",
                          "My sister's name is {v}.", "My little sister {v} is in college.",
                          "I'm close with my sister {v}."),
      ("What is my sister's name?", "What's my sister called?", "Who is my sister?", "Remind me of my sister's name.",
       "Do you remember my sister's name?", "What did I say my sister is called?", "Whom do I call my sister?",
       "What name does my sister have?"),
      "Your sister is called {v}.",
      ("{n}'s sister is {v}.", "{n} has a sister named {v}.", "{n}'s sister is called {v}.", "{n}'s sister: {v}."),
      ("What is the name of {n}'s sister?", "Who is {n}'s sister?", "What is {n}'s sister called?",
       "What is {n}'s sister's name?")),
    A("partner", "name", ("My partner's name is {v}.", "I'm married to {v}.", "My wife {v} says hi.",
                          "My husband {v} cooks dinner.", "{v} and I have been together for years.",
                          "I live with my partner {v}.", "My fiancé is called {v}.", "I'm dating {v}."),
      ("What is my partner's name?", "Who am I married to?", "What's my partner called?",
       "Remind me who my partner is.", "Do you remember my partner's name?", "Who do I live with?",
       "Who is my spouse?", "What did I say my partner's name is?"),
      "Your partner is {v}.",
      ("{n}'s partner is {v}.", "{n} is married to {v}.", "{n} lives with a partner named {v}.",
       "{n}'s spouse: {v}."),
      ("Who is {n}'s partner?", "Who is {n} married to?", "What is the name of {n}'s partner?",
       "Who is {n}'s spouse?")),
    A("birthday", "date", ("My birthday is on {v}.", "I was born on {v}.", "I celebrate my birthday on {v}.",
                           "{v} is my birthday.", "Every year on {v} I turn a year older.",
                           "My birthday falls on {v}.", "Mark {v}, that's my birthday.",
                           "I'll have cake on {v}, my birthday."),
      ("When is my birthday?", "What day was I born?", "On what date do I celebrate my birthday?",
       "Remind me when my birthday is.", "Do you remember my birthday?", "Which day is my birthday?",
       "When do I turn a year older?", "What date did I say my birthday is?"),
      "Your birthday is on {v}.",
      ("{n}'s birthday is on {v}.", "{n} was born on {v}.", "{n} celebrates a birthday on {v}.",
       "{n}'s birthday: {v}."),
      ("When is {n}'s birthday?", "On what date was {n} born?", "When does {n} celebrate a birthday?",
       "What is {n}'s birthday?")),
    A("age", "number", ("I'm {v} years old.", "I just turned {v}.", "I am {v}.", "I'll be {v} for another month.",
                        "At {v}, I feel great.", "My age is {v}.", "I'm {v}, believe it or not.",
                        "I celebrated turning {v} recently."),
      ("How old am I?", "What is my age?", "Remind me how old I am.", "Do you remember my age?",
       "What age did I just turn?", "How many years old am I?", "What did I say my age is?",
       "Can you tell me how old I am?"),
      "You are {v} years old.",
      ("{n} is {v} years old.", "{n} just turned {v}.", "{n}'s age is {v}.", "{n}, age {v}."),
      ("How old is {n}?", "What is {n}'s age?", "What age is {n}?", "How many years old is {n}?")),
    A("car", "car", ("I drive a {v}.", "My car is a {v}.", "I commute in my {v}.", "I bought a {v} last spring.",
                     "I've got a {v} in the garage.", "My ride is a {v}.", "I park my {v} outside.",
                     "I get around in a {v}."),
      ("What car do I drive?", "What is my car?", "Which car did I buy?", "Remind me what I drive.",
       "Do you remember my car?", "What do I commute in?", "What's in my garage?", "Which car is mine?"),
      "You drive a {v}.",
      ("{n} drives a {v}.", "{n}'s car is a {v}.", "{n} owns a {v}.", "{n} commutes in a {v}."),
      ("What car does {n} drive?", "What is {n}'s car?", "Which car does {n} own?", "What does {n} drive?"),
      ("I sold my old car and got a {v}.", "I drive a {v} now.", "My new car is a {v}.",
       "I traded in for a {v}.")),
    A("drink", "drink", ("My usual drink is {v}.", "I always order {v}.", "I start every day with {v}.",
                         "My go-to drink is {v}.", "I can't function without my {v}.", "I'm a {v} person.",
                         "I'll have {v}, as always.", "My favourite drink is {v}."),
      ("What is my usual drink?", "What do I always order to drink?", "What's my go-to drink?",
       "How do I start every day?", "Remind me of my favourite drink.", "Do you remember my usual order?",
       "What should you get me to drink?", "What drink did I say I love?"),
      "Your usual drink is {v}.",
      ("{n}'s usual drink is {v}.", "{n} always orders {v}.", "{n} drinks {v} every morning.",
       "{n}'s go-to drink: {v}."),
      ("What is {n}'s usual drink?", "What does {n} always order to drink?", "What does {n} drink every morning?",
       "What is {n}'s go-to drink?")),
    A("street", "street", ("I live on {v}.", "My address is on {v}.", "Our house is on {v}.",
                           "I just moved onto {v}.", "You can find me on {v}.", "My street is {v}.",
                           "My flat is on {v}.", "I walk down {v} to get home."),
      ("What street do I live on?", "Which street is my address on?", "Where is my house?",
       "Remind me of my street.", "Do you remember what street I live on?", "What's my street called?",
       "On which street can you find me?", "What street did I say my flat is on?"),
      "You live on {v}.",
      ("{n} lives on {v}.", "{n}'s address is on {v}.", "{n}'s house is on {v}.", "{n}'s street: {v}."),
      ("What street does {n} live on?", "Which street is {n}'s address on?", "Where is {n}'s house?",
       "On which street does {n} live?")),
    A("code", "code", ("My locker code is {v}.", "The code for my locker is {v}.", "My PIN is {v}.",
                       "Remember my door code: {v}.", "My gym locker combination is {v}.",
                       "The alarm code at my place is {v}.", "My membership number is {v}.",
                       "Save this, my booking reference is {v}."),
      ("What is my locker code?", "What code did I give you?", "Remind me of my code.", "What's my PIN?",
       "Do you remember my code?", "What combination did I tell you?", "What number did I ask you to save?",
       "Which code is mine?"),
      "Your code is {v}.",
      ("{n}'s locker code is {v}.", "The code of {n} is {v}.", "{n}'s PIN: {v}.", "{n} uses the code {v}."),
      ("What is {n}'s locker code?", "What is the code of {n}?", "What is {n}'s PIN?", "What code does {n} use?")),
    # Held out whole (never in training): the score on these measures new attributes, not new phrasings.
    A("country", "country", ("I grew up in {v}.", "I'm originally from {v}.", "My home country is {v}.",
                             "I was raised in {v}."),
      ("Where did I grow up?", "Which country am I from?", "What is my home country?", "Where was I raised?"),
      "You grew up in {v}.",
      ("{n} grew up in {v}.", "{n} is from {v}.", "{n}'s home country is {v}.", "{n} was raised in {v}."),
      ("Where did {n} grow up?", "Which country is {n} from?", "What is {n}'s home country?",
       "Where was {n} raised?")),
    A("friend", "name", ("My best friend is {v}.", "I've known my best friend {v} since school.",
                         "{v} is my closest friend.", "My best mate is called {v}."),
      ("Who is my best friend?", "What's my best friend's name?", "Who is my closest friend?",
       "Remind me who my best mate is."),
      "Your best friend is {v}.",
      ("{n}'s best friend is {v}.", "{n} is close friends with {v}.", "{n}'s closest friend is {v}.",
       "{n}'s best mate: {v}."),
      ("Who is {n}'s best friend?", "Who is {n}'s closest friend?", "What is the name of {n}'s best friend?",
       "Who is {n} close friends with?")),
    A("book", "title", ("My favorite book is {v}.", "I keep rereading {v}.", "The book I love most is {v}.",
                        "I'm halfway through {v}, my favourite read."),
      ("What is my favorite book?", "Which book do I keep rereading?", "What book do I love most?",
       "What am I reading?"),
      "Your favorite book is {v}.",
      ("{n}'s favorite book is {v}.", "{n} keeps rereading {v}.", "{n} loves the book {v}.",
       "{n}'s favourite read: {v}."),
      ("What is {n}'s favorite book?", "Which book does {n} keep rereading?", "What book does {n} love?",
       "What is {n}'s favourite read?")),
    A("plate", "plate", ("My license plate is {v}.", "My car's plate number is {v}.", "The plate on my car reads {v}.",
                         "My registration number is {v}."),
      ("What is my license plate?", "What's my plate number?", "What does the plate on my car read?",
       "What is my registration number?"),
      "Your license plate is {v}.",
      ("{n}'s license plate is {v}.", "{n}'s plate number is {v}.", "The plate on {n}'s car reads {v}.",
       "{n}'s registration: {v}."),
      ("What is {n}'s license plate?", "What is {n}'s plate number?", "What does {n}'s plate read?",
       "What is {n}'s registration number?")),
)
HELD_OUT_ATTRIBUTES = frozenset({"country", "friend", "book", "plate"})
BY_KEY = {a.key: a for a in ATTRIBUTES}


def open_attribute(frames: Attribute, thing: str, kind: str) -> Attribute:
    """`frames` (an attribute family whose phrasings hold `{t}`) told about `thing`, with values of `kind`."""
    def fill(forms: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(f.replace("{t}", thing) for f in forms)
    return Attribute(f"open:{thing}", kind, fill(frames.tell), fill(frames.ask), frames.answer.replace("{t}", thing),
                     fill(frames.note), fill(frames.ask_about), fill(frames.change))


FAVORITE = A(
    "favorite", "",
    ("My favorite {t} is {v}.", "{v} is my all-time favorite {t}.", "The {t} I like best is {v}.",
     "If you ask me for my favorite {t}, it's {v}.", "I'm a huge fan of {v}, my favourite {t}.",
     "My number one {t}? {v}.", "Favorite {t}: {v}, no contest.", "I keep coming back to {v}, my favorite {t}."),
    ("What is my favorite {t}?", "Which {t} do I like best?", "Remind me of my favourite {t}.",
     "Do you remember my favorite {t}?", "What did I say my favorite {t} is?", "What's my number one {t}?",
     "Which {t} is my all-time favorite?", "Can you tell me my favorite {t}?"),
    "Your favorite {t} is {v}.",
    ("{n}'s favorite {t} is {v}.", "The {t} {n} likes best is {v}.", "{n} is a big fan of the {t} {v}.",
     "{n}'s favourite {t}: {v}."),
    ("What is {n}'s favorite {t}?", "Which {t} does {n} like best?", "What {t} is {n} a fan of?",
     "What is {n}'s favourite {t}?"),
    ("My favorite {t} is {v} now.", "These days my favorite {t} is {v}.",
     "I've switched: {v} is my favorite {t} now.", "Honestly my favorite {t} has become {v}."))
PERSON = A(
    "person", "",
    ("My {t} is called {v}.", "My {t}'s name is {v}.", "{v} is my {t}.", "I talked to my {t} {v} today.",
     "My {t}, {v}, says hi.", "Meet {v}, my {t}.", "I'm seeing my {t} {v} tomorrow.", "I had lunch with my {t} {v}."),
    ("What is my {t}'s name?", "What's my {t} called?", "Who is my {t}?", "Remind me of my {t}'s name.",
     "Do you remember my {t}'s name?", "What did I say my {t} is called?", "What name does my {t} have?",
     "Can you tell me who my {t} is?"),
    "Your {t} is called {v}.",
    ("{n}'s {t} is called {v}.", "{n}'s {t} is {v}.", "{v} is {n}'s {t}.", "{n}'s {t}: {v}."),
    ("What is the name of {n}'s {t}?", "Who is {n}'s {t}?", "What is {n}'s {t} called?", "What is {n}'s {t}'s name?"),
    ("I have a new {t} now: {v}.", "My {t} is {v} now.", "My new {t} is called {v}.", "These days my {t} is {v}."))
DETAIL = A(
    "detail", "",
    ("My {t} is {v}.", "Note my {t}: {v}.", "For the record, my {t} is {v}.", "My {t}? It's {v}.",
     "Please remember my {t}, {v}.", "{v}, that's my {t}.", "I just got my {t}: {v}.",
     "Keep this handy, my {t} is {v}."),
    ("What is my {t}?", "Remind me of my {t}.", "Do you remember my {t}?", "What did I say my {t} is?",
     "What's my {t} again?", "Can you tell me my {t}?", "Which {t} did I give you?", "I forgot my {t}, what is it?"),
    "Your {t} is {v}.",
    ("{n}'s {t} is {v}.", "The {t} of {n} is {v}.", "{n} gave {v} as the {t}.", "{n}'s {t}: {v}."),
    ("What is {n}'s {t}?", "What is the {t} of {n}?", "Which {t} did {n} give?", "What {t} does {n} have?"),
    ("My {t} changed, it's {v} now.", "My new {t} is {v}.", "Update: my {t} is {v}.", "I have a new {t}: {v}."))
# Open attributes: a few families of frames over many things, so that training shows far more kinds of
# fact than the hand-written attributes above (what a user may tell is open-ended). Training data only
# (`_profile` with training values): every evaluation keeps the hand-written attributes, and no thing
# here is a held-out attribute's.
OPEN_ATTRIBUTES: tuple[Attribute, ...] = (
    *(open_attribute(FAVORITE, thing, kind) for thing, kind in (
        ("movie", "phrase"), ("song", "phrase"), ("band", "phrase"), ("TV show", "phrase"), ("podcast", "phrase"),
        ("board game", "phrase"), ("video game", "phrase"), ("album", "phrase"), ("singer", "full_name"),
        ("painter", "full_name"), ("author", "full_name"), ("actor", "full_name"), ("restaurant", "company"),
        ("café", "company"), ("holiday destination", "city"), ("city", "city"), ("number", "number"),
        ("sport", "activity"), ("dessert", "food"), ("snack", "food"), ("animal", "animal"))),
    *(open_attribute(PERSON, thing, "name") for thing in (
        "brother", "cousin", "neighbour", "boss", "dentist", "landlord", "son", "daughter", "grandmother",
        "grandfather", "niece", "nephew", "coach", "piano teacher", "doctor", "roommate", "colleague", "cat",
        "horse", "mentor")),
    *(open_attribute(DETAIL, thing, kind) for thing, kind in (
        ("flight number", "code"), ("seat number", "code"), ("wifi password", "code"), ("bike lock code", "code"),
        ("hotel room", "room"), ("library card number", "code"), ("tracking number", "code"),
        ("gate number", "code"), ("apartment number", "room"), ("shoe size", "number"), ("wedding date", "date"),
        ("anniversary", "date"), ("pharmacy", "company"),
        ("gym", "company"), ("bank", "company"), ("middle name", "name"))),
)


def phrasings(forms: Sequence[str], split: Split) -> list[str]:
    """The split's share of a family of phrasings: every fourth one is held out for evaluation."""
    if len(forms) < 4:
        return list(forms)
    return [f for i, f in enumerate(forms) if (i % 4 == 3) == (split == "eval")]


def attributes(split: Split, held_out_attributes: bool = True) -> list[Attribute]:
    """Training draws only the trained attributes; evaluation draws all, or only the held-out ones."""
    if split == "train":
        return [a for a in ATTRIBUTES if a.key not in HELD_OUT_ATTRIBUTES]
    return [a for a in ATTRIBUTES if a.key in HELD_OUT_ATTRIBUTES] if held_out_attributes else list(ATTRIBUTES)


ACKS = ["Nice!", "Got it.", "That's lovely.", "Good to know.", "I'll remember that.", "Oh, interesting!",
        "Thanks for telling me.", "Sounds great.", "Noted.", "How fun!", "Cool, tell me more.", "Oh nice, I see."]
OPENERS = ["Hi! ", "Hello. ", "Hey there. ", "", "Quick note about me: ", "Nice to meet you. ", "Hiya! ",
           "Good morning! ", "So, a bit about me: "]
INTRO = ["I'm {n}.", "My name is {n}.", "{n} here.", "Call me {n}.", "This is {n}."]
LINKS = [" ", " Also, ", " And ", " Oh, and ", " By the way, ", " Plus, "]
PASSING = ["Long day today. {s} Anyway, how are you?", "{s} Just thought you should know.",
           "Ugh, traffic was awful. {s}", "{s} But that's a story for another time.",
           "Random thought: {s}", "Not much new. {s} What about you?"]


@cache
def msc_lines(split: Split) -> tuple[str, ...]:
    """Real human chit-chat turns from MSC dialogues: valid file for training, test file for evaluation."""
    name = "msc_dialogue_session_3_valid.jsonl" if split == "train" else "msc_dialogue_session_3_test.jsonl"
    out = []
    for line in (shared_data() / "msc_multi_session_chat" / name).read_text().splitlines():
        episode = json.loads(line)
        out += [t["text"].strip() for t in episode["dialog"] if 20 <= len(t["text"].strip()) <= 160]
    return tuple(out)


@dataclass
class Fact:
    attribute: Attribute
    value: str
    person: str


def _pick(forms: Sequence[str], split: Split, rng: random.Random, used: list[str], tag: str) -> str:
    """A phrasing from the split's share of `forms`, recorded in `used` as `tag.index` (its provenance)."""
    allowed = [i for i, f in enumerate(forms) if f in phrasings(forms, split)]
    i = rng.choice(allowed)
    used.append(f"{tag}.{i}")
    return forms[i]


def _tell(fact: Fact, rng: random.Random, split: Split, used: list[str], update: bool = False) -> str:
    kind = "change" if update else "tell"
    forms = fact.attribute.change if update else fact.attribute.tell
    # Never re-case: a value that opens a sentence ("teal is my favourite colour") stays as drawn.
    return _pick(forms, split, rng, used, f"{fact.attribute.key}.{kind}").format(v=fact.value)


def _answer(fact: Fact, first_person: bool) -> str:
    return fact.attribute.answer.format(v=fact.value) if first_person else \
        fact.attribute.note[0].format(n=fact.person, v=fact.value)


def _profile(rng: random.Random, split: Split, n: int, held_out_attributes: bool,
             values: Split | None = None) -> tuple[str, list[Fact]]:
    values = values or split
    person = draw_value("name", rng, values)
    pool = attributes(split, held_out_attributes)
    if split == "eval" and held_out_attributes:  # held-out attributes plus trained ones around them
        pool = pool + rng.sample(attributes("train"), 4)
    chosen = rng.sample(pool, min(n, len(pool)))
    if values == "train":  # training data: about half of the facts of open attributes (no evaluation has them)
        k = sum(rng.random() < 0.5 for _ in chosen)
        chosen = chosen[k:] + rng.sample(OPEN_ATTRIBUTES, k)
        rng.shuffle(chosen)
    return person, [Fact(a, draw_value(a.kind, rng, values), person) for a in chosen]


@dataclass
class Dialogue:
    """A synthetic user's sessions (`(role, text)` turns, oldest first) and one question about them.

    `value` answers `question` (for an update, the value told last; `old_value` the one it replaced);
    `roles` and `segment_tokens` are the `absorb_messages` settings the sessions are absorbed with.
    """

    person: str
    sessions: list[list[tuple[str, str]]]
    question: str
    value: str
    old_value: str | None
    response: str
    roles: tuple[str, ...] | None
    segment_tokens: int
    templates: list[str]


def dialogue(rng: random.Random, split: Split = "train", held_out_attributes: bool = False,
             update: bool | None = None, values: Split | None = None) -> Dialogue:
    """Draw a synthetic user who tells 3-7 facts over sessions between chit-chat (an introduction may
    state several at once; a fact may come in passing), maybe changes one later (`update`, drawn 1 in 5
    when None), and is asked for one of them. Phrasings come from `split`, values from `values`
    (default: the same split)."""
    used: list[str] = []
    values = values or split
    person, facts = _profile(rng, split, rng.randint(3, 7), held_out_attributes, values)
    chit = msc_lines(split)
    updatable = [f for f in facts if f.attribute.change]
    update = bool(updatable) and (rng.random() < 0.2 if update is None else update)
    target = rng.choice(updatable if update else facts)

    def chat(turns: list[tuple[str, str]]) -> None:
        for _ in range(rng.randint(0, 2)):
            turns += [("user", rng.choice(chit)), ("assistant", rng.choice(ACKS))]

    sessions: list[list[tuple[str, str]]] = []
    pending = list(facts)
    rng.shuffle(pending)
    while pending:
        turns: list[tuple[str, str]] = []
        chat(turns)
        if not sessions and rng.random() < 0.6:  # an introduction stating several facts in one message
            k = min(len(pending), rng.randint(1, 3))
            told, pending = pending[:k], pending[k:]
            text = rng.choice(OPENERS) + rng.choice(INTRO).format(n=person)
            text += "".join(rng.choice(LINKS) + _tell(f, rng, split, used) for f in told)
            turns.append(("user", text.strip()))
        else:
            said = _tell(pending.pop(), rng, split, used)
            turns.append(("user", rng.choice(PASSING).format(s=said) if rng.random() < 0.3 else said))
        turns.append(("assistant", rng.choice(ACKS)))
        chat(turns)
        sessions.append(turns)
    value = target.value
    if update:
        while value == target.value:
            value = draw_value(target.attribute.kind, rng, values)
        said = _tell(Fact(target.attribute, value, person), rng, split, used, update=True)
        sessions.append([("user", rng.choice(chit)), ("assistant", rng.choice(ACKS)), ("user", said),
                         ("assistant", rng.choice(ACKS))])
    question = _pick(target.attribute.ask, split, rng, used, f"{target.attribute.key}.ask")
    if update:
        stem, end = question[:-1], question[-1]  # "?" or the "." of a request ("Remind me what I drive.")
        question = rng.choice([f"{stem} now{end}", question, f"{stem} currently{end}",
                               "These days, " + question[0].lower() + question[1:]])
    return Dialogue(person=person, sessions=sessions, question=question, value=value,
                    old_value=target.value if update else None,
                    response=_answer(Fact(target.attribute, value, person), first_person=True),
                    roles=None if rng.random() < 0.5 else ("user",), segment_tokens=rng.choice([48, 96, 160, 256]),
                    templates=used)


def conversation_sample(rng: random.Random, split: Split = "train", count_tokens: Callable[[str], int] | None = None,
                        held_out_attributes: bool = False, hybrid: bool = False) -> Sample:
    """A `dialogue` cut into memories as `absorb_messages` cuts them (`count_tokens`: the base model's
    tokenizer, in which segment budgets are counted).

    `Sample.context` is what the teacher reads (the memory that holds the answer; for an update, the old
    and the new memory in order), `Sample.memories` what the student's adapter composes: the relevant
    memories plus 0-3 distractor memories of the same user, in random order. With `hybrid` the student
    also reads the newest memory that holds the answer in its prompt, as `hybrid` mode puts its best
    snippet there: the adapter must then leave the answer to the teacher's wording, not say the memory
    back.
    """
    d = dialogue(rng, split, held_out_attributes)
    count = count_tokens or (lambda text: len(text) // 4)
    memories = [seg for turns in d.sessions
                for seg in segment_turns(transcript_turns(turns, d.roles), count, d.segment_tokens)]
    holding = [m for m in memories if d.value in m or (d.old_value is not None and d.old_value in m)]
    others = [m for m in memories if m not in holding]
    composed = holding + rng.sample(others, min(len(others), rng.randint(0, 3)))
    rng.shuffle(composed)
    kind = "conversation:update" if d.old_value is not None else "conversation"
    return Sample(context="\n\n".join(holding), question=d.question, answer=d.value,
                  source=f"hybrid:{kind}" if hybrid else kind, response=d.response, memories=composed,
                  student_context=holding[-1] if hybrid else None, templates=d.templates)


def note_sample(rng: random.Random, split: Split = "train", held_out_attributes: bool = False) -> Sample:
    """Third-person notes about a person (1-4 facts), asked about by name."""
    used: list[str] = []
    person, facts = _profile(rng, split, rng.randint(1, 4), held_out_attributes)
    text = " ".join(_pick(f.attribute.note, split, rng, used, f"{f.attribute.key}.note").format(n=person, v=f.value)
                    for f in facts)
    fact = rng.choice(facts)
    question = _pick(fact.attribute.ask_about, split, rng, used, f"{fact.attribute.key}.ask_about").format(n=person)
    return Sample(context=text, question=question, answer=fact.value, source="note",
                  response=_answer(fact, first_person=False), templates=used)


def _closed(r: random.Random, s: Split, options: Sequence[str]) -> str:
    """A value from a short closed list, keeping its values on their side of the train/eval split."""
    return r.choice([o for o in options if is_eval_value(o) == (s == "eval")] or list(options))


def _order(r: random.Random, s: Split) -> dict[str, str]:
    item = f"{r.choice(['blue', 'large', 'wireless', 'vintage', 'steel'])} " \
        f"{r.choice(['kettle', 'lamp', 'backpack', 'speaker', 'jacket', 'desk'])}"
    return {"order_id": draw_value("code", r, s), "status": _closed(
        r, s, ["shipped", "processing", "delivered", "out for delivery", "on hold", "returned", "delayed"]),
        "carrier": _closed(r, s, ["DHL", "UPS", "FedEx", "Royal Mail", "PostNL", "La Poste", "GLS", "DPD"]),
        "delivery_date": draw_value("date", r, s),
        "item": item}


def _booking(r: random.Random, s: Split) -> dict[str, str]:
    return {"hotel": draw_value("hotel", r, s), "city": draw_value("city", r, s),
            "check_in": draw_value("date", r, s), "room": draw_value("room", r, s),
            "confirmation": draw_value("code", r, s)}


def _contact(r: random.Random, s: Split) -> dict[str, str]:
    return {"name": draw_value("full_name", r, s), "company": draw_value("company", r, s),
            "role": draw_value("job", r, s), "city": draw_value("city", r, s)}


# tool name -> (a result's fields, {field: questions about it})
TOOLS: dict[str, tuple[Callable[[random.Random, Split], dict[str, str]], dict[str, tuple[str, ...]]]] = {
    "lookup_order": (_order,
    {"status": ("What is the status of my order?", "Has my order shipped yet?", "Where is my order at?",
                    "What's the status on order {order_id}?"),
         "carrier": ("Which carrier is delivering my order?", "Who is shipping my package?",
                     "What delivery company has my order?", "Which courier did they use for {order_id}?"),
         "delivery_date": ("When will my order arrive?", "What is the delivery date of my order?",
                           "When should I expect my package?", "What day is {order_id} arriving?"),
         "order_id": ("What is my order number?", "What was the order id?", "Which order did you look up?",
                      "What's the reference of my order?")}),
    "get_booking": (_booking,
                    {"hotel": ("Which hotel am I staying at?", "What's the name of my hotel?",
                               "Where did I book my stay?", "What hotel was in the booking?"),
                     "city": ("Which city is my hotel in?", "Where is my booking?", "What city am I traveling to?",
                              "In which town did I book the hotel?"),
                     "check_in": ("When do I check in?", "What's my check-in date?", "On what day does my stay start?",
                                  "When is my hotel check-in?"),
                     "room": ("What is my room number?", "Which room did I get?", "What room am I in?",
                              "What's the room number on the booking?"),
                     "confirmation": ("What is my confirmation code?", "What's the booking reference?",
                                      "Which confirmation number did I get?", "What code confirms my booking?")}),
    "get_contact": (_contact,
                    {"company": ("Which company does {name} work for?", "Where is {name} employed?",
                                 "What's {name}'s company?", "Who does {name} work for?"),
                     "role": ("What is {name}'s role?", "What does {name} do?", "What's {name}'s job title?",
                              "What position does {name} hold?"),
                     "city": ("Where is {name} based?", "Which city is {name} in?", "Where does {name} live?",
                              "In what city is {name} located?")}),
}


def tool_sample(rng: random.Random, split: Split = "train") -> Sample:
    """A tool's JSON result rendered by `render_tool_output`, asked about one field."""
    name = rng.choice(sorted(TOOLS))
    make, questions = TOOLS[name]
    record = make(rng, split)
    text = render_tool_output(record)
    field = rng.choice(sorted(questions))
    used: list[str] = []
    question = _pick(questions[field], split, rng, used, f"{name}.{field}").format(**record)
    value = record[field]
    return Sample(context=text, question=question, answer=value, source=f"tool:{name}",
                  response=f"The {field.replace('_', ' ')} is {value}.", templates=used)


NEEDLES = (  # (statement, question, answer sentence, value kind)
    ("The secret code of {n} is {v}.", "What is the secret code of {n}?", "The secret code of {n} is {v}.", "code"),
    ("{n}'s locker combination is {v}.", "What is {n}'s locker combination?", "It is {v}.", "code"),
    ("Remember: the wifi password at {n}'s place is {v}.", "What is the wifi password at {n}'s place?",
     "The wifi password is {v}.", "code"),
    ("The meeting with {n} was moved to {v}.", "When is the meeting with {n}?", "The meeting is on {v}.", "date"),
    ("{n} hid the spare key in {v}.", "Where did {n} hide the spare key?", "In {v}.", "city"),
    ("The new manager of the project is {v}.", "Who is the new manager of the project?", "The new manager is {v}.",
     "full_name"),
    ("{n} flew to {v} for the conference.", "Where did {n} fly for the conference?", "{n} flew to {v}.", "city"),
    ("The package for {n} will be delivered by {v}.", "Who will deliver the package for {n}?",
     "It will be delivered by {v}.", "company"),
    ("{n}'s appointment is on {v}.", "When is {n}'s appointment?", "It is on {v}.", "date"),
    ("Note to self: {n}'s reference number is {v}.", "What is {n}'s reference number?", "It is {v}.", "code"),
    ("The lab results for {n} are filed under {v}.", "Under what name are {n}'s lab results filed?",
     "Under {v}.", "full_name"),
    ("The vault at {n}'s bank opens with {v}.", "What opens the vault at {n}'s bank?", "The code {v}.", "code"),
)


def needle_sample(rng: random.Random, essays: Sequence[str], filler_chars: int, split: Split = "train") -> Sample:
    """One of many needle kinds (codes, dates, places, names) hidden at a random depth in essay filler."""
    used: list[str] = []
    statement, question, response, kind = _pick(NEEDLES, split, rng, used, "needle")
    person, value = draw_value("name", rng, split), draw_value(kind, rng, split)
    context = bury(rng, essays, filler_chars, statement.format(n=person, v=value))
    return Sample(context=context, question=question.format(n=person), answer=value, source="needle",
                  response=response.format(n=person, v=value), templates=used)


def held_out_templates() -> set[str]:
    """Provenance tags (`attribute.family.index`) of every phrasing kept for evaluation."""
    tags = set()
    for a in ATTRIBUTES:
        for family in ("tell", "change", "ask", "note", "ask_about"):
            forms = getattr(a, family)
            tags |= {f"{a.key}.{family}.{i}" for i, f in enumerate(forms)
                     if a.key in HELD_OUT_ATTRIBUTES or f in phrasings(forms, "eval")}
    for name, (_, questions) in TOOLS.items():
        for field, forms in questions.items():
            tags |= {f"{name}.{field}.{i}" for i, f in enumerate(forms) if f in phrasings(forms, "eval")}
    return tags | {f"needle.{i}" for i, n in enumerate(NEEDLES) if n in phrasings(NEEDLES, "eval")}


def leaks(samples: Sequence[Sample]) -> list[str]:
    """What of the held-out material appears in `samples` (empty when nothing does): a held-out phrasing or
    attribute (by provenance, and any held-out question verbatim), an eval-only value as an answer, an MSC
    test-file line in a memory."""
    held = held_out_templates()
    questions = {f for a in ATTRIBUTES for forms in (a.ask, a.ask_about) for f in forms
                 if a.key in HELD_OUT_ATTRIBUTES or f in phrasings(forms, "eval")}
    test_lines = set(msc_lines("eval")) - set(msc_lines("train"))
    problems = []
    for s in samples:
        if held & set(s.templates):
            problems.append(f"held-out phrasing {sorted(held & set(s.templates))} in {s.context[:60]!r}")
        if s.question in questions:
            problems.append(f"held-out question {s.question!r}")
        if s.templates and is_eval_value(s.answer):
            problems.append(f"eval-only value {s.answer!r} in a {s.source} sample")
        lines = {line.split(": ", 1)[-1] for t in [s.context, *(s.memories or [])] for line in t.splitlines()}
        if lines & test_lines:
            problems.append(f"MSC test line in {s.context[:60]!r}")
    return problems
