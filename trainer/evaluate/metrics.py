"""Task metrics of `ft-desk eval`: per-example scores, base-vs-tuned aggregates with intervals, few-shot honesty.

Pure functions on strings and numbers; numpy, rouge-score, sacrebleu and jsonschema are imported where used (no
torch). Every aggregate comes with a 95% interval - Wilson for rates, a percentile bootstrap over examples for
everything else, and a paired bootstrap for the tuned-minus-base change - and with the number of examples it
rests on. Below `MIN_EXAMPLES` the interval is printed next to the number ("only 8 examples: +/-0.31"), and a
change whose paired interval contains zero is called "unclear" rather than better or worse.

Scales: rates and ROUGE-L are fractions in [0, 1]; chrF and BLEU are sacrebleu's 0-100 scores (BLEU and chrF
aggregates are corpus-level, as sacrebleu and published numbers compute them; per-example values are
sentence-level); loss is mean cross-entropy per target token (nats), perplexity its exponential.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

from ft_desk.trainer.errors import UserError

# Note: below this many examples a metric is shown with its count and 95% interval instead of alone. At n = 30 a
# rate's worst-case Wilson half-width is +/-0.17 and it halves only at n ~ 120, so under 30 most differences a user
# would act on are inside the noise; 30 is also the usual floor for the normal approximation behind a mean's error
# bar. Intervals are computed (and kept in report.json) at every size.
MIN_EXAMPLES = 30
# Note: bootstrap resamples per interval. 1000 puts percentile bounds within about +/-0.01 of their limit for
# [0, 1] metrics and costs milliseconds with numpy (corpus BLEU/chrF: well under a second for 1000 examples).
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 20240611
# Note: with fewer paired examples than this no change is called better or worse. Even "every example improved"
# is then not significant at 5%: a two-sided sign test on 5 of 5 gives p = 2 x 0.5^5 = 0.0625 (6 of 6: 0.031),
# and a bootstrap over so few examples has too few distinct resamples to be trusted.
MIN_VERDICT_EXAMPLES = 6
Z95 = 1.959964

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_FENCE = re.compile(r"^```[A-Za-z0-9_-]*[ \t]*\n(.*?)\n?```$", re.DOTALL)


# ------------------------------------------------------------------ per-example scores

def normalize_answer(text: str) -> str:
    """Lowercase, punctuation and the articles a/an/the removed, whitespace collapsed (SQuAD-style)."""
    text = text.lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(output: str, reference: str) -> float:
    """1.0 when the output equals the reference, ignoring surrounding whitespace."""
    return float(output.strip() == reference.strip())


def normalized_exact_match(output: str, reference: str) -> float:
    return float(normalize_answer(output) == normalize_answer(reference))


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer  # optional-size import: only when ROUGE is asked for

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of stemmed words), 0..1. rouge-score keeps only a-z/0-9 words,
    so text in other scripts scores 0."""
    return float(_rouge_scorer().score(reference, output)["rougeL"].fmeasure)


def chrf(output: str, reference: str) -> float:
    """Sentence-level chrF (character n-gram F-score), 0..100."""
    import sacrebleu

    return float(sacrebleu.sentence_chrf(output, [reference]).score)


def bleu(output: str, reference: str) -> float:
    """Sentence-level BLEU with sacrebleu's default smoothing, 0..100."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(output, [reference]).score)


def parse_json_output(text: str) -> tuple[bool, Any]:
    """(parsed, value): the whole output as JSON, or the inside of an output that is exactly one ``` fence."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return True, json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return False, None


def load_schema_validator(path: str | Path):
    """A jsonschema validator for the schema in `path` (its $schema picks the draft; 2020-12 otherwise)."""
    import jsonschema  # only when a schema is given

    path = Path(path).expanduser()
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--json-schema {path}: no such file", hint="pass the path of a JSON Schema file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--json-schema {path} is not valid JSON ({exc})", hint="fix the schema file") from None
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise UserError(f"--json-schema {path} is not a valid JSON Schema: {exc.message}",
                        hint="check it against the draft named in its $schema") from None
    return cls(schema)


def schema_valid(validator, value: Any) -> bool:
    return bool(validator.is_valid(value))


def compile_regex(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise UserError(f"--regex {pattern!r} is not a valid regular expression ({exc})",
                        hint="use Python re syntax; anchor with ^...$ to match the whole output") from None


def regex_match(pattern: re.Pattern, output: str) -> float:
    """1.0 when the pattern is found in the stripped output (re.search; anchor it to require the whole)."""
    return float(pattern.search(output.strip()) is not None)


# ------------------------------------------------------------------ aggregates with intervals

def wilson_interval(successes: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a binomial rate (sane at 0/n and n/n, unlike the normal one)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


Aggregate = Callable[[Any], Any]  # index array (n,) or (B, n) -> value or (B,) values


def mean_of(values: Sequence[float]) -> Aggregate:
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    return lambda idx: arr[idx].mean(axis=-1)


def ratio_of(numerators: Sequence[float], denominators: Sequence[float]) -> Aggregate:
    """Sum of numerators over sum of denominators (token-weighted mean loss)."""
    import numpy as np

    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    return lambda idx: num[idx].sum(axis=-1) / np.maximum(den[idx].sum(axis=-1), 1.0)


def exp_of(agg: Aggregate) -> Aggregate:
    import numpy as np

    return lambda idx: np.exp(np.minimum(agg(idx), 50.0))


def corpus_score(kind: str, outputs: Sequence[str], references: Sequence[str]) -> Aggregate:
    """Corpus BLEU or chrF of a resample, from per-sentence sufficient statistics (sacrebleu's own method for
    its significance tests), so resampling does not re-tokenize."""
    import numpy as np
    from sacrebleu.metrics import BLEU, CHRF

    metric = BLEU() if kind == "bleu" else CHRF()
    stats = np.asarray(metric._extract_corpus_statistics(list(outputs), [list(references)]), dtype=np.float64)

    def agg(idx):
        summed = stats[idx].sum(axis=-2)
        if summed.ndim == 1:
            return float(metric._compute_score_from_stats(summed.tolist()).score)
        return np.array([metric._compute_score_from_stats(row.tolist()).score for row in summed])

    return agg


@dataclass
class MetricRow:
    """One line of the metrics table: base, tuned, the change, and how sure we can be of each."""

    name: str  # key: exact_match, rouge_l, ...
    label: str  # what the table shows
    better: str  # higher | lower | closer_to_1
    scale: str  # rate | score | x100 | loss | ppl | ratio | tokens (how to print it)
    n: int
    base: float | None
    tuned: float | None
    delta: float | None
    base_ci95: tuple[float, float] | None = None
    tuned_ci95: tuple[float, float] | None = None
    delta_ci95: tuple[float, float] | None = None
    verdict: str = "same"  # better | worse | unclear | same | - (no direction)
    few: bool = False
    note: str = ""
    unit: str = "examples"  # what n counts

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("base_ci95", "tuned_ci95", "delta_ci95"):
            if out[key] is not None:
                out[key] = [round(float(x), 6) for x in out[key]]
        for key in ("base", "tuned", "delta"):
            if out[key] is not None:
                out[key] = round(float(out[key]), 6)
        return out


def _goodness(better: str, x):
    import numpy as np

    if better == "lower":
        return -x
    if better == "closer_to_1":
        return -np.abs(x - 1.0)
    return x


def compare(name: str, label: str, base: Aggregate, tuned: Aggregate, n: int, *, better: str = "higher",
            scale: str = "score", rate_counts: tuple[float, float] | None = None, unit: str = "examples",
            samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> MetricRow:
    """A MetricRow for one metric: point values on all n examples, percentile-bootstrap intervals from the same
    resamples for base, tuned and their paired change (Wilson intervals for rates, given `rate_counts`)."""
    import numpy as np

    if n == 0:
        return MetricRow(name, label, better, scale, 0, None, None, None, verdict="unclear",
                         few=True, note=f"no {unit}", unit=unit)
    everything = np.arange(n)
    b, t = float(base(everything)), float(tuned(everything))
    row = MetricRow(name, label, better, scale, n, b, t, t - b, unit=unit)
    if n >= 2:
        idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
        bb, tt = np.asarray(base(idx), dtype=np.float64), np.asarray(tuned(idx), dtype=np.float64)
        gain = _goodness(better, tt) - _goodness(better, bb)

        def pct(x):
            return (float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5)))

        row.base_ci95, row.tuned_ci95, row.delta_ci95 = pct(bb), pct(tt), pct(tt - bb)
        gain_ci = pct(gain)
    else:
        gain_ci = (-math.inf, math.inf)
    if rate_counts is not None:
        row.base_ci95 = wilson_interval(rate_counts[0], n)
        row.tuned_ci95 = wilson_interval(rate_counts[1], n)
    if better == "none":
        row.verdict = "-"
    elif b == t:
        row.verdict = "same"
    elif n < MIN_VERDICT_EXAMPLES:
        row.verdict = "unclear"
    elif gain_ci[0] > 0:
        row.verdict = "better"
    elif gain_ci[1] < 0:
        row.verdict = "worse"
    else:
        row.verdict = "unclear"
    row.few = n < MIN_EXAMPLES
    if row.few:
        row.note = few_note(row)
    return row


def compare_rates(name: str, label: str, base_hits: Sequence[float], tuned_hits: Sequence[float],
                  better: str = "higher") -> MetricRow:
    return compare(name, label, mean_of(base_hits), mean_of(tuned_hits), len(base_hits), better=better,
                   scale="rate", rate_counts=(float(sum(base_hits)), float(sum(tuned_hits))))


def compare_means(name: str, label: str, base_values: Sequence[float], tuned_values: Sequence[float], *,
                  better: str = "higher", scale: str = "score") -> MetricRow:
    return compare(name, label, mean_of(base_values), mean_of(tuned_values), len(base_values), better=better,
                   scale=scale)


def format_value(value: float | None, scale: str, signed: bool = False) -> str:
    """How a metric value reads in the table: rates as percentages, scores with fitting precision."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    sign = "+" if signed else ""
    if scale == "rate":
        return f"{value * 100:{sign}.1f}%"
    if scale == "ppl":
        if abs(value) >= 1e6:
            return f"{value:{sign}.2e}"
        if abs(value) >= 1000:
            return f"{value:{sign},.0f}"
        return f"{value:{sign}.2f}"
    if scale == "x100" and 0 < abs(value) < 1:
        return f"{value:{sign}.2f}"  # BLEU 0.03 is not 0.0
    if scale in ("x100", "tokens"):
        return f"{value:{sign}.1f}"
    if scale == "ratio":
        return f"{value:{sign}.2f}"
    return f"{value:{sign}.3f}"


def few_note(row: MetricRow) -> str:
    """'only 8 examples: +/-0.31' - the half-width of the tuned (else base) interval, in the metric's scale."""
    ci = row.tuned_ci95 or row.base_ci95
    unit = row.unit if row.n != 1 else row.unit.removesuffix("s")
    if row.n < 2 or ci is None:
        return f"only {row.n} {unit}: no interval"
    half = (ci[1] - ci[0]) / 2
    if row.scale == "rate":
        spread = f"{half * 100:.0f} points"
    else:
        spread = format_value(half, row.scale)
    return f"only {row.n} {unit}: +/-{spread}"
