import os

# Hub calls must fail fast, never retry for half a minute (the README's test command sets this too).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
