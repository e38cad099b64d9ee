"""Real English sentences that the test fixtures synthesize with espeak-ng (one list for all)."""

ENGLISH = [
    "the quick brown fox jumps over the lazy dog",
    "she sells sea shells by the sea shore",
    "a journey of a thousand miles begins with a single step",
    "all that glitters is not gold",
    "the early bird catches the worm",
    "actions speak louder than words",
    "better late than never",
    "every cloud has a silver lining",
    "knowledge is power and time is money",
    "where there is a will there is a way",
]
