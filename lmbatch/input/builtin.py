"""Built-in input sets, so that jobs run offline with no input of the user's.

`builtin://sample_prompts`: a few hundred deterministic prompts of very different lengths
(columns id, prompt, topic). `builtin://gpt2_example`: the one prompt of the classic transformers
example. Each resolves to a Parquet file written once into the cache directory.
"""

from __future__ import annotations

import os
import random
import tempfile

from lmbatch.storage import cache_dir

WORDS = (
    "the a an of to in and or but with for on at by from as is are was were be been it this that these "
    "data table row column file job model batch token prompt answer question summary report value "
    "cluster node replica memory disk network time speed error result output input stream block "
    "write read quick slow large small first last next every each some many few long short new old "
    "explain describe list compare translate summarize classify extract rewrite count find check "
    "why how what when where which who please briefly carefully clearly simply "
    "river mountain city market garden ocean forest bridge school library kitchen engine rocket "
    "planet music history science language story letter recipe weather travel health sport money"
).split()
TOPICS = ("science", "travel", "cooking", "finance", "sport", "history")
_VERSION = "v1"


def _sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(max(1, n_words))]
    return " ".join(words).capitalize() + "."


def sample_sentences(n: int = 2000, seed: int = 1234) -> list[str]:
    """Deterministic corpus the built-in tokenizers are trained on."""
    rng = random.Random(seed)
    return [_sentence(rng, rng.randint(3, 30)) for _ in range(n)]


def sample_prompts(n: int = 300, seed: int = 0) -> dict[str, list]:
    """n prompts whose lengths are heavy-tailed (log-normal), from a couple of words to several hundred."""
    rng = random.Random(seed)
    ids, prompts, topics = [], [], []
    for i in range(n):
        n_words = min(400, max(2, int(rng.lognormvariate(3.0, 1.0))))
        ids.append(i)
        prompts.append(_sentence(rng, n_words))
        topics.append(rng.choice(TOPICS))
    return {"id": ids, "prompt": prompts, "topic": topics}


BUILTIN_INPUTS = {
    "sample_prompts": sample_prompts,
    "gpt2_example": lambda: {"id": [0], "prompt": ["I love computer programming because"]},
}


def builtin_input_path(name: str) -> str:
    """Write a built-in input set once (atomically: parallel runs may race) and return its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if name not in BUILTIN_INPUTS:
        raise ValueError(f"unknown built-in input {name!r}; choose one of {sorted(BUILTIN_INPUTS)}")
    target = cache_dir() / "data" / f"{name}-{_VERSION}.parquet"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, scratch = tempfile.mkstemp(suffix=".parquet", dir=target.parent)
        os.close(fd)
        pq.write_table(pa.table(BUILTIN_INPUTS[name]()), scratch)
        os.replace(scratch, target)
    return str(target)
