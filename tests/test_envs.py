"""Task generators: deterministic by seed, gold answers correct, answer checks, offline errors."""

import json

import pytest

from thinktok.envs import TaskConfig, load_task
from thinktok.errors import UserError
from thinktok.models.vocab import offline_gpt2_tokenizer


def task(name, **kw):
    return load_task(TaskConfig(name=name, num_train=40, num_val=5, num_test=5, **kw))


@pytest.mark.parametrize("name", ["multiplication", "hops", "prosqa", "prontoqa"])
def test_deterministic_by_seed_and_splits_disjoint(name):
    a, b, c = task(name, seed=1), task(name, seed=1), task(name, seed=2)
    assert a.dataset["train"].to_list() == b.dataset["train"].to_list()
    assert a.dataset["train"]["prompt"] != c.dataset["train"]["prompt"]
    train, test = set(a.dataset["train"]["prompt"]), set(a.dataset["test"]["prompt"])
    assert not train & test


@pytest.mark.parametrize("digits", [2, 3, 5])
def test_multiplication_gold_checks_out(digits):
    t = task("multiplication", digits=digits)
    for row in t.dataset["train"]:
        a, b = row["a"], row["b"]
        assert len(str(a)) == len(str(b)) == digits
        assert row["prompt"] == f"{a} * {b} =" and int(row["answer"]) == a * b
        assert sum(int(s) for s in row["steps"]) == a * b  # partial products add up
        assert t.check(t.target(row, "cot"), row) and t.check(t.target(row, "answer"), row)
        assert not t.check(f" {a * b + 1}", row)


def test_multiplication_easy_fraction_only_in_train():
    t = task("multiplication", easy_fraction=0.25)
    train = t.dataset["train"]
    easy = [r for r in train if r["b"] < 10]
    assert len(easy) == 10  # 25% of 40
    assert all(int(r["answer"]) == r["a"] * r["b"] and len(r["steps"]) == 1 for r in easy)
    assert all(r["b"] >= 10 for split in ("validation", "test") for r in t.dataset[split])
    assert len(set(train["prompt"])) == len(train)
    with pytest.raises(UserError, match="easy_fraction"):
        task("multiplication", easy_fraction=1.0)


def test_multiplication_spaced_reversed():
    t = task("multiplication", digits=2, spaced=True, reverse=True)
    row = t.dataset["train"][0]
    a, b = row["a"], row["b"]
    assert row["prompt"] == f"{' '.join(str(a)[::-1])} * {' '.join(str(b)[::-1])} ="
    assert row["answer"] == " ".join(str(a * b)[::-1])
    assert t.check(" " + " ".join(str(a * b)[::-1]), row) and t.check(str(a * b)[::-1], row)


def reachable(edges, start):
    seen, todo = {start}, [start]
    while todo:
        n = todo.pop()
        for a, b in edges:
            if a == n and b not in seen:
                seen.add(b)
                todo.append(b)
    return seen


def test_prosqa_graph_is_right():
    t = task("prosqa", depth=4, branching=2, distractors=2)
    for row in t.dataset["train"]:
        sym = row["idx_to_symbol"]
        reach = reachable(row["edges"], row["root"])
        assert row["target"] in reach and row["neg_target"] not in reach
        assert row["answer"].endswith(f"is a {sym[row['target']]}.")
        assert sym[row["target"]] in row["prompt"] and sym[row["neg_target"]] in row["prompt"]
        assert len(row["steps"]) == 3  # depth 4: three intermediate concepts
        for a, b in row["edges"]:
            assert f"Every {sym[a]} is a {sym[b]}." in row["prompt"]
        assert t.check(t.target(row, "cot"), row)
        assert not t.check(f" X is a {sym[row['neg_target']]}.", row)


def test_prontoqa_answer_follows_the_chain():
    t = task("prontoqa", depth=5)
    answers = set()
    for row in t.dataset["train"]:
        last = row["steps"][-1]
        assert len(row["steps"]) == 6
        assert row["answer"] == ("False" if " not " in last else "True")
        answers.add(row["answer"])
        assert t.check(t.target(row, "cot"), row)
    assert answers == {"True", "False"}


def test_prosqa_import_coconut_json(tmp_path):
    rows = [{"question": f"Is Tom a a{i} or b{i}?", "answer": f"Tom is a a{i}.", "steps": [f"Tom is a c{i}."],
             "edges": [[0, 1]], "root": 0, "target": 1, "neg_target": 2, "idx_to_symbol": [
                 "c", f"a{i}", f"b{i}"]}
            for i in range(6)]
    path = tmp_path / "prosqa.json"
    path.write_text(json.dumps(rows))
    t = load_task(TaskConfig(name="prosqa", path=str(path), num_train=4, num_val=1, num_test=1))
    assert t.dataset["train"][0]["prompt"] == "Is Tom a a0 or b0?"
    path.write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(ValueError, match="question, answer and steps"):
        load_task(TaskConfig(name="prosqa", path=str(path), num_train=1, num_val=1, num_test=1))


def test_text_task_from_file(tmp_path):
    (tmp_path / "a.txt").write_text(" ".join(f"w{i}" for i in range(100)))
    t = load_task(TaskConfig(name="text", path=str(tmp_path), prompt_words=5, answer_words=5, num_train=5,
                             num_val=2, num_test=2))
    row = t.dataset["train"][1]
    assert row["prompt"] == "w10 w11 w12 w13 w14" and row["answer"] == "w15 w16 w17 w18 w19"
    with pytest.raises(ValueError, match="needs path="):
        load_task(TaskConfig(name="text"))


def test_text_task_from_pydoc_topics():
    """The offline English corpus: the first row is the first topic's first words, by hand."""
    from pydoc_data.topics import topics

    t = load_task(TaskConfig(name="text", dataset="pydoc", prompt_words=8, answer_words=8, num_train=1000,
                             num_val=100, num_test=100))
    words = topics[sorted(topics)[0]].split()
    row = t.dataset["train"][0]
    assert row["prompt"] == " ".join(words[:8]) and row["answer"] == " ".join(words[8:16])
    assert len({r["prompt"] for r in t.dataset["test"]} & {r["prompt"] for r in t.dataset["train"]}) == 0


def test_gsm8k_offline_is_a_clear_error():
    with pytest.raises(ValueError, match="GSM8K needs the Hugging Face hub"):
        load_task(TaskConfig(name="gsm8k"))


def test_bad_task_config():
    with pytest.raises(ValueError, match="unknown task 'sudoku'"):
        load_task(TaskConfig(name="sudoku"))
    with pytest.raises(ValueError, match="only .* distinct problems"):
        load_task(TaskConfig(name="multiplication", digits=1, num_train=100, num_val=1, num_test=1))


@pytest.mark.parametrize("depth", [1, 3, 5])
def test_hops_answer_follows_the_prompts_pointers(depth):
    t = task("hops", depth=depth, symbols=6)
    for row in t.dataset["train"]:
        table, start = row["prompt"].removeprefix("map ").split(" | ")
        pairs = [p.split() for p in table.split(" , ")]
        nxt = dict(pairs)
        assert sorted(nxt) == sorted(nxt.values()) and len(nxt) == 6  # a permutation of 6 letters
        at = start.removesuffix(" =")
        walked = []
        for _ in range(depth):
            at = nxt[at]
            walked.append(at)
        assert row["answer"] == walked[-1] and row["steps"] == walked[:-1]
        assert t.check(t.target(row, "cot"), row) and t.check(t.target(row, "answer"), row)
    tok = offline_gpt2_tokenizer()
    assert all(len(tok(" " + s).input_ids) == 1 for s in row["steps"] + [row["answer"]])


def test_hops_bad_config_is_refused():
    with pytest.raises(ValueError, match="symbols"):
        task("hops", symbols=30)
