"""A curator's session with ``shiq-data``, one command after the other as in the README: build -> stats ->
filter -> dedup -> split -> mix -> export -> build from the export. Every step's output is checked against
pandas on the input file (and the GPT-2 tokenizer called directly for token counts)."""

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from data_cli_runs import write_jsonl

from shiq_data.buffer import read_shard
from shiq_data.cli import main
from shiq_data.curate.stats import buffer_stats

pytestmark = pytest.mark.usefixtures("tokenizers_once")

SOURCES = ("forum", "wiki", "chat")
WORDS = (
    "apple river stone cloud maple tiger violin garden copper ocean lantern meadow falcon pepper harbor cinder "
    "marble willow saddle quartz amber basil cedar delta ember fable glacier hazel iris jasper"
).split()


def session_records() -> list[dict]:
    """About 280 records: 100 prompts of three sources with 1-4 completions each, rewards, extra fields (lang,
    score (sometimes missing), tags), then exact repeats, repeats differing only in case and spacing, and near
    repeats (one word changed) placed after their originals."""
    rng = random.Random(0)
    recs = []
    for i in range(100):
        source = SOURCES[i % 3]
        prompt = f"[{source}] Question {i}: tell me about the {rng.choice(WORDS)} and the {rng.choice(WORDS)}."
        for k in range(1 + i % 4):
            rec = {
                "prompt": prompt,
                "completion": " " + " ".join(rng.choices(WORDS, k=rng.randint(6, 14))) + f" ({i}.{k})",
                "reward": round(rng.gauss(0.2, 1.0), 3),
                "source": source,
                "lang": rng.choice(["en", "en", "fr"]),
                "tags": rng.sample(["short", "math", "code", "fun"], 2),
            }
            if rng.random() < 0.85:
                rec["score"] = rng.randint(0, 4)
            recs.append(rec)
    out = list(recs)
    for n, j in enumerate(rng.sample(range(len(recs)), 30)):
        rec = dict(recs[j])
        if n % 3 == 0:
            rec["reward"] = round(rec["reward"] + 1, 3)  # the same text, another reward: a duplicate still
        elif n % 3 == 1:
            rec["completion"] = "  " + rec["completion"].upper().replace(" ", "   ")  # the same once normalised
        else:
            words = rec["completion"].split()
            words[1] = "zebra" if words[1] != "zebra" else "yak"
            rec["completion"] = " " + " ".join(words)  # a near duplicate: stays under exact dedup
        out.insert(out.index(recs[j]) + 1 + n % 2, rec)
    return out


def other_records() -> list[dict]:
    """A second input to mix in: 40 prompts of a fourth source with 1-3 completions each."""
    rng = random.Random(1)
    return [
        {"prompt": f"Survey {i}: pick a {rng.choice(WORDS)}.", "completion": f" {rng.choice(WORDS)} {k}",
         "reward": round(rng.uniform(-1, 1), 3), "source": "survey"}
        for i in range(40)
        for k in range(1 + i % 3)
    ]  # fmt: skip


def shiq_data(capsys, *argv) -> str:
    """Run ``shiq-data ARGV`` as a curator would; its stdout (the command must succeed)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def rows_of(folder: Path) -> pd.DataFrame:
    m = json.loads((folder / "manifest.json").read_text())
    return pd.concat([read_shard(folder / s["file"]).to_pandas() for s in m["shards"]], ignore_index=True)


def norm(s: pd.Series) -> pd.Series:
    return s.str.lower().str.split().str.join(" ")


def texts(df: pd.DataFrame) -> list[tuple]:
    return list(zip(df.prompt, df.completion, df.reward))


def stats_lines(stdout: str) -> dict:
    """``shiq-data stats`` table -> {name: its label, then its whitespace-separated fields}; the overall row,
    labelled ``(all sources)``, under ``all``."""
    out = {}
    for line in stdout.splitlines()[2:]:
        if line.startswith("(all sources) "):
            out["all"] = ["(all sources)", *line.removeprefix("(all sources)").split()]
        elif not line.startswith("group sizes"):
            out[line.split()[0]] = line.split()
    return out


def test_curator_session(tmp_path, capsys, gpt2):
    tok, _ = gpt2
    inp = write_jsonl(tmp_path / "rows.jsonl", session_records())
    df = pd.read_json(
        inp, lines=True, dtype=False, precise_float=True
    )  # the independent view of the input, in file order
    df["extra_score"] = df.score  # NaN where the record has none
    df["tokens"] = [
        len(tok(p, add_special_tokens=False)["input_ids"]) + len(tok(c, add_special_tokens=False)["input_ids"]) + 1
        for p, c in zip(df.prompt, df.completion)
    ]
    assert 250 <= len(df) <= 320 and df.groupby("prompt").size().max() > 1
    b = tmp_path / "buffers"

    # 1. build (two processes), keeping the text, reward and extra fields of every row
    out = shiq_data(capsys, "build", "jsonl", inp, "--tokenizer", "gpt2", "--out", b / "all", "--shard-rows", 64,
                    "--workers", 2, "--no-progress")  # fmt: skip
    assert f"{len(df)} rows, {df.tokens.sum()} tokens" in out
    built = rows_of(b / "all")
    assert texts(built) == texts(df) and built.source.tolist() == df.source.tolist()
    assert [json.loads(e)["lang"] for e in built.extra] == df.lang.tolist()
    assert [len(t) for t in built.tokens] == df.tokens.tolist()
    # a group per prompt text, numbered in order of first appearance
    assert built.group_id.tolist() == pd.factorize(df.prompt)[0].tolist()

    # 2. stats: rows, groups, lengths and rewards per source, as pandas has them
    out = shiq_data(capsys, "stats", b / "all")
    table = stats_lines(out)
    for name, part in [("all", df), *df.groupby("source")]:
        fields = table[name]
        assert int(fields[1]) == len(part) and int(fields[2]) == part.prompt.nunique()
        t = part.tokens
        assert fields[3] == f"{t.mean():.1f}/{t.median():.0f}/{t.max():.0f}"
        r = part.reward
        assert fields[6:10] == [f"{r.mean():.4g}", f"{r.std():.3g}", f"{r.min():.3g}", f"{r.max():.3g}"]
    sizes = df.groupby("prompt").size().value_counts().sort_index()
    assert out.splitlines()[-1].endswith(", ".join(f"{k}: {v}" for k, v in sizes.items()))
    exact, _ = buffer_stats(b / "all")
    for q, key in ((0.5, "p50"), (0.95, "p95")):
        assert exact["all"]["reward"][key] == pytest.approx(df.reward.quantile(q), abs=1e-12)
        for source, part in df.groupby("source"):
            assert exact["sources"][source]["reward"][key] == pytest.approx(part.reward.quantile(q), abs=1e-12)
    out = shiq_data(capsys, "stats", b / "all", "--where", "lang = 'fr' AND reward > 0")
    assert f"({((df.lang == 'fr') & (df.reward > 0)).sum()} rows, where" in out

    # 3. filter on the reward, the source and an extra field (a missing score is NULL: not kept)
    expr = "reward > -0.5 AND source <> 'chat' AND score >= 1"
    out = shiq_data(capsys, "filter", b / "all", "--where", expr, "--out", b / "kept", "--no-progress")
    want = df[(df.reward > -0.5) & (df.source != "chat") & (df.extra_score >= 1)]
    assert f"kept {len(want)} of {len(df)} rows" in out
    kept = rows_of(b / "kept")
    assert texts(kept) == texts(want) and kept.source.tolist() == want.source.tolist()

    # 4. dedup: exact duplicates (normalised text) go, the first of each stays; near duplicates stay
    out = shiq_data(capsys, "dedup", b / "kept", "--out", b / "dedup", "--no-progress")
    keyed = want.assign(p=norm(want.prompt), c=norm(want.completion))
    unique = keyed.drop_duplicates(subset=["p", "c"])
    gone = keyed[~keyed.index.isin(unique.index)].groupby("source").size()
    raw_twins = keyed[~keyed.index.isin(unique.index)].completion.isin(want.completion.drop_duplicates(keep=False))
    assert gone.sum() >= 5 and raw_twins.any()  # the data has exact repeats and repeats in other case and spacing
    assert f"kept {len(unique)} of {len(want)} rows" in out
    assert ", ".join(f"{s}: {n}" for s, n in gone.items()) in out
    dedup = rows_of(b / "dedup")
    assert texts(dedup) == texts(unique)
    near = unique[unique.completion.str.contains("zebra|yak")]
    assert len(near) and set(texts(near)) <= set(texts(dedup))

    # 5. split by prompt: no prompt on both sides, the two sides together are the input, in its order
    out = shiq_data(capsys, "split", b / "dedup", "--test-fraction", 0.25, "--by", "prompt", "--seed", 7,
                    "--out", b / "split", "--no-progress")  # fmt: skip
    train, test = rows_of(b / "split" / "train"), rows_of(b / "split" / "test")
    assert not set(norm(train.prompt)) & set(norm(test.prompt))
    assert sorted(texts(train) + texts(test)) == sorted(texts(unique))
    for side in (train, test):
        order = [texts(unique).index(t) for t in texts(side)]
        assert order == sorted(order)
    target = round(0.25 * len(unique))
    assert target <= len(test) < target + unique.groupby(norm(unique.prompt)).size().max()
    assert f"{b / 'split'}/test {len(test)} rows" in out

    # 6. mix the train side with another buffer, 3:1, whole prompt groups, unique group ids
    other_in = write_jsonl(tmp_path / "survey.jsonl", other_records())
    odf = pd.read_json(other_in, lines=True, dtype=False, precise_float=True)
    shiq_data(capsys, "build", "jsonl", other_in, "--tokenizer", "gpt2", "--out", b / "survey", "--no-progress")
    out = shiq_data(capsys, "mix", f"{b / 'split' / 'train'}:3", f"{b / 'survey'}:1", "--rows", 48, "--seed", 1,
                    "--out", b / "mix", "--no-progress")  # fmt: skip
    mix = rows_of(b / "mix")
    from_train = mix.row_id.str.startswith("m0-")
    for part, source_df, target in ((mix[from_train], train, 36), (mix[~from_train], odf, 12)):
        groups_in = {prompt: sorted(texts(g)) for prompt, g in source_df.groupby("prompt")}
        assert target <= len(part) < target + max(map(len, groups_in.values()))
        for _, g in part.groupby("group_id"):
            assert g.prompt.nunique() == 1 and sorted(texts(g)) == groups_in[g.prompt.iloc[0]]  # whole groups
    assert mix.groupby("group_id").prompt.nunique().max() == 1 and mix.group_id.nunique() == mix.prompt.nunique()
    assert f"{len(mix)} rows" in out

    # 7. export as JSONL and Parquet (with a dataset card): the records are the input rows
    for fmt in ("jsonl", "parquet"):
        shiq_data(capsys, "export", b / "mix", "--format", fmt, "--out", tmp_path / f"export-{fmt}")
        assert "license:" in (tmp_path / f"export-{fmt}" / "README.md").read_text()
    ex = pd.read_json(tmp_path / "export-jsonl" / "data.jsonl", lines=True, dtype=False, precise_float=True)
    pq_ex = pd.read_parquet(tmp_path / "export-parquet" / "data.parquet")
    assert texts(ex) == texts(mix) == texts(pq_ex) and ex.source.tolist() == mix.source.tolist()
    by_text = {(r.prompt, r.completion, r.reward): r for r in pd.concat([df, odf]).itertuples()}
    for rec in ex.itertuples():
        original = by_text[(rec.prompt, rec.completion, rec.reward)]
        assert rec.source == original.source
        if original.source != "survey":
            assert rec.lang == original.lang and rec.tags == original.tags
            assert (np.isnan(rec.score) and np.isnan(original.score)) or rec.score == original.score
    assert ex.groupby("group").prompt.nunique().max() == 1

    # 8. build from the export: the same rows, tokens and groups again
    shiq_data(capsys, "build", "jsonl", tmp_path / "export-jsonl" / "data.jsonl", "--tokenizer", "gpt2",
              "--out", b / "again", "--no-progress")  # fmt: skip
    shiq_data(capsys, "build", "parquet", tmp_path / "export-parquet" / "data.parquet", "--tokenizer", "gpt2",
              "--out", b / "again-pq", "--no-progress")  # fmt: skip
    for folder in (b / "again", b / "again-pq"):
        again = rows_of(folder)
        assert texts(again) == texts(mix) and again.source.tolist() == mix.source.tolist()
        assert [t.tolist() for t in again.tokens] == [t.tolist() for t in mix.tokens]
        assert pd.factorize(again.group_id)[0].tolist() == pd.factorize(mix.group_id)[0].tolist()
