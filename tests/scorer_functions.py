"""Python function scorers for tests/test_scorer_cli.py (``shiq-eval run --scorer python:scorer_functions:NAME``)."""


def length_and_letters(prompts, completions):
    """A reward any reader can recompute: completion words minus a tenth of its 'w' characters, plus the
    prompt's length over 100."""
    return [len(c.split()) - 0.1 * c.count("w") + len(p) / 100 for p, c in zip(prompts, completions)]


def not_a_list(prompts, completions):
    return "1.0"


def one_short(prompts, completions):
    return [0.0] * (len(completions) - 1)


def with_nan(prompts, completions):
    return [float("nan")] * len(completions)


def one_argument(completions):
    return [0.0] * len(completions)


def raises(prompts, completions):
    return {}["no such key"]


def too_large(prompts, completions):
    return [10**400 for _ in completions]
