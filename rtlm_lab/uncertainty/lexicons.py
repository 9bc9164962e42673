"""Hand-written cue lexicons used by the scorers (all lower-case).

Weights are the *evidence strength* one occurrence contributes (about 1.0 = one clear cue). They were
set a priori from the linguistics literature on hedges and vague language (Lakoff 1973 "hedges";
Channell 1994 "Vague Language"; Hyland 1998) - not fitted to the validation labels.
"""

from __future__ import annotations

import re

# --- vagueness --------------------------------------------------------------------------------------
# (regex over the lower-cased text, weight). Multi-word hedges first; matches may not overlap.
VAGUE_CUES: list[tuple[str, float]] = [
    # approximators / shields (Prince et al. 1982)
    (r"\bkind of\b", 1.0), (r"\bsort of\b", 1.0), (r"\bkinda\b", 1.0), (r"\bsorta\b", 1.0),
    (r"\bmore or less\b", 1.0), (r"\bor something( like that)?\b", 1.0), (r"\bor whatever\b", 1.0),
    (r"\band (stuff|things|so on|so forth)\b", 1.0), (r"\bthings like that\b", 0.8),
    (r"\bnot (really |quite |entirely )?sure\b", 0.8), (r"\bi guess\b", 0.9), (r"\bi suppose\b", 0.8),
    (r"\bi think\b", 0.4), (r"\bit depends\b|\bdepends\b", 0.8),
    # plausibility shields / epistemic modals
    (r"\bmaybe\b", 1.0), (r"\bperhaps\b", 1.0), (r"\bpossibly\b", 0.9), (r"\bprobably\b", 0.8),
    (r"\bmight\b", 0.6), (r"\bsomehow\b", 0.8),
    # vague quantifiers (Channell 1994)
    (r"\ba lot\b", 0.8), (r"\blots\b", 0.7), (r"\ba bunch\b", 0.8), (r"\btons of\b", 0.7),
    (r"\ba (little|bit)\b", 0.6), (r"\ba few\b", 0.5), (r"\bseveral\b", 0.4), (r"\bsome\b", 0.3),
    (r"\bmany\b", 0.2),
    # vague nouns / placeholders
    (r"\bstuff\b", 0.8), (r"\bthings?\b", 0.3), (r"\bsomething\b", 0.5), (r"\bwhatever\b", 0.8),
    (r"\bsometimes?\b", 0.6), (r"\bsomewhere\b", 0.6), (r"\bsomeday\b", 0.8), (r"\bsomeone\b", 0.4),
    # approximate numbers and degree modifiers
    (r"\b(around|about|roughly|approximately) (\d+|one|two|three|four|five|six|seven|eight|nine|ten|"
     r"twenty|a hundred|a thousand)\b", 0.7),
    (r"\b\w+ish\b", 1.0), (r"\broughly\b|\bapproximately\b", 0.6),
    (r"\blike (a |an )?(\d+|million|billion|hundred|thousand|ton|bunch|zillion)", 0.8),
    (r"\bsomewhat\b", 1.0), (r"\bfairly\b", 0.8), (r"\bpretty (\w+)\b", 0.6), (r"\brather\b", 0.5),
    (r"\bquite\b", 0.4), (r"\bkind of\b", 0.0),
    (r"\blately\b", 0.3), (r"\bsoonish\b|\bsoon\b", 0.3), (r"\b(eh|meh|ehh)\b", 0.4),
    (r"\b(ok|okay|fine)\b", 0.2),
]
# words ending in "-ish" that are not approximators
ISH_STOP = {"english", "irish", "spanish", "british", "finish", "wish", "fish", "dish", "polish", "swedish",
            "danish", "turkish", "jewish", "scottish", "selfish", "publish", "establish", "rubbish",
            "foolish", "childish", "punish", "vanish", "cherish", "nourish", "flourish", "squish", "lavish",
            "perish", "relish", "stylish", "ish", "finnish", "kurdish", "amish", "radish", "garnish",
            "diminish", "abolish", "astonish", "accomplish", "furnish", "banish", "demolish", "outlandish",
            "feverish", "sluggish", "ticklish", "devilish", "skittish", "sheepish", "peevish", "squeamish",
            "yiddish", "hashish", "parish", "bish", "blemish", "replenish", "brandish", "tarnish",
            "extinguish", "distinguish", "relinquish", "anguish", "languish", "vanquish", "whitish"}
VAGUE_RE = [(re.compile(p), w) for p, w in VAGUE_CUES if w > 0]

# --- open-endedness ---------------------------------------------------------------------------------
# Phrases that ask for opinion, narration, explanation or creation (weight), anywhere in a question or
# request. Closed forms (yes/no, factoid wh) get no weight by default.
OPEN_CUES: list[tuple[str, float]] = [
    (r"\btell me (a little |a bit |more |something |everything )?(about|more)\b", 1.6),
    (r"\btell me (a|an) (story|joke|poem)\b", 1.4), (r"\btell me something\b", 1.2),
    (r"\bwhat do you think\b", 1.5), (r"\bwhat did you think\b", 1.3),
    (r"\bhow (do|did|does|would) (you|people|one|i) feel\b", 1.6),
    (r"\b(your|any) (thoughts|opinions?|views?|take|advice|tips|suggestions)\b", 1.3),
    (r"\bwhat('s| is| was) it like\b", 1.5), (r"\bwhat (is|are|was|were) .{0,30}\blike\b", 0.6),
    (r"\bwhat would you do\b", 1.4), (r"\bwhat if\b", 1.2),
    (r"\b(explain|describe|elaborate|discuss|compare|imagine|summari[sz]e|brainstorm)\b", 1.4),
    (r"\b(write|compose) (me )?(a|an|some)\b", 1.2),
    (r"\btalk (to me )?about\b", 1.2), (r"\bwhat makes\b", 1.2),
    (r"\bhow (can|could|should|do|would) (i|we|you|one|people)\b(?! (feel|do you do))", 1.0),
    (r"\bhow come\b", 1.3),
    (r"\bwhat do you (like|love|enjoy|hate|do for fun|do in your free time)\b", 1.0),
    (r"\bfor fun\b", 0.7),
    (r"\bhow (was|is|were|did) (your|the|it)\b", 0.9), (r"\bhow did you\b", 0.6),
    (r"\bfeel about\b|\bthink (about|of)\b", 0.7),
]
OPEN_RE = [(re.compile(p), w) for p, w in OPEN_CUES]
# Sentence-initial wh-words: weight of the bare form (explanatory wh vs factoid wh).
WH_WEIGHT = {"why": 1.6, "how": 0.5, "what": 0.1, "who": 0.0, "whom": 0.0, "whose": 0.0, "when": 0.0,
             "where": 0.0, "which": 0.0}
# "how" followed by these asks for a quantity or a conventional greeting: closed.
HOW_CLOSED = {"many", "much", "old", "long", "far", "tall", "big", "often", "are", "r", "'s", "is", "about",
              "late", "early", "fast", "high", "deep", "heavy", "large", "small"}

# --- multi-part / question detection ------------------------------------------------------------------
WH_WORDS = {"what", "why", "how", "who", "whom", "whose", "when", "where", "which"}
QUESTION_AUX = {"do", "does", "did", "is", "are", "was", "were", "am", "can", "could", "will", "would",
                "should", "shall", "have", "has", "had", "may", "might", "must", "'re", "'s"}
SUBJECT_PRONOUNS = {"i", "you", "he", "she", "it", "we", "they", "there", "that", "this", "u", "ya"}
# imperative request verbs (clause-initial base form)
REQUEST_VERBS = {"tell", "explain", "describe", "give", "list", "recommend", "suggest", "help", "show",
                 "write", "find", "name", "share", "send", "remind", "set", "call", "play", "book", "make",
                 "check", "add", "turn", "open", "text", "compare", "summarize", "summarise", "translate",
                 "teach", "let", "read", "search", "look", "order", "schedule", "cancel", "start", "stop",
                 "create", "draw", "imagine", "discuss", "define", "calculate", "convert", "say", "sing"}
CLAUSE_LINKERS = {"and", "or", "but", "also", "plus", "then", "so", ",", ";", "-", "--", ":"}

# --- lexical (semantic / syntactic) ------------------------------------------------------------------
# High-frequency "light" words whose polysemy is bleached in ordinary use: not counted as semantic cues.
LIGHT_WORDS = {
    "be", "is", "am", "are", "was", "were", "been", "being", "have", "has", "had", "do", "does", "did",
    "get", "got", "make", "made", "go", "going", "went", "gone", "take", "took", "come", "came", "say",
    "said", "know", "think", "want", "like", "see", "saw", "look", "need", "let", "thing", "things",
    "stuff", "way", "lot", "good", "great", "nice", "bad", "new", "really", "just", "feel", "try", "use",
    "well", "yeah", "yes", "no", "okay", "ok", "oh", "haha", "lol", "hi", "hello", "hey", "thanks",
    "thank", "please", "sure", "mean", "guess", "love", "hope", "wish", "name", "favorite", "favourite",
    "kind", "sort", "much", "many", "more", "most", "other", "same", "own", "right", "little", "big",
    "tell", "ask", "give", "put", "keep", "seem", "watch", "talk", "work", "day", "today", "tomorrow",
    "yesterday", "tonight", "morning", "night", "week", "weekend", "year", "people", "person", "man",
    "woman", "guy", "friend", "one", "time", "lately", "later", "doing", "done", "happen", "live",
}

# Common English homographs (unrelated meanings under one spelling), after the homograph norms of
# Twilley et al. (1994) and Armstrong, Tokowicz & Plaut (2012, eDom). WordNet does not separate
# homonymy from regular polysemy, so these get a boost and other polysemes a discount (see scorers).
# Keys: word -> WordNet POS letters for which it is a homograph.
HOMOGRAPHS = {w: "n" for w in """
bank bat bass bow bark bill board bolt boxer cabinet calf cap capital cell chest china club coach
court crane current date deck diamond draft duck fan file firm fly glasses grave hide jam key lead
letter match mine mint mold mole mouse nail note novel organ palm pen pitch plant pool port pound
present pupil racket range ring rock root rose row ruler scale seal sentence shed sink sole spring
square stable staff stalk star suit tank tear temple tie tire toast trunk wave yard bowl pit jar
bug chip cricket crop die fork gum lap lime log net punch quarry race refrain riddle sack saw
stamp stern story strike swallow tip vessel watch batter bluff buck cape count dock lighter
""".split()}
HOMOGRAPHS.update({"light": "a", "fine": "n", "fair": "na", "flat": "na", "cold": "n", "right": "n",
                   "firm": "na", "just": "a", "bright": "a", "hard": "a", "sharp": "a", "mean": "a"})
