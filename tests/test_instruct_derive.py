"""TinyStoriesInstruct records derived from plain stories (``data.instruct: derive``), the
instruction-following eval's counting rules (``eval --instruct``), and a tiny end-to-end
train + eval run on hand-made stories."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest
import torch

from deepseek_mini import Config, UserError
from deepseek_mini.cli.main import main
from deepseek_mini.data.demo_corpus import demo_stories
from deepseek_mini.data.derive import (
    FIELD_CHANCE,
    derivable,
    derive_documents,
    derive_fields,
    has_dialogue,
    parse_record,
    story_sentences,
)
from deepseek_mini.data.inflection import attach, forms, lemma_index
from deepseek_mini.data.instruct import has_instruct_layout
from deepseek_mini.data.pos_words import ADJECTIVES, NOUNS, VERBS
from deepseek_mini.data.tokens import held_out_documents, prepare_data
from deepseek_mini.instruct_eval import (
    Checks,
    Decoding,
    HFBackend,
    Task,
    has_sentence,
    prompt_text,
    run_instruct_eval,
    summarize,
    tasks_from_documents,
    uses_all_words,
)
from tests.tiny_run import tiny_overrides

STORY = ("Tom was a happy boy. He ran to the park with his red ball.\n"
         '"Look at me!" said Tom. He kicked the ball over the tall tree.')
PLAIN = [parse_record(doc)[1] for doc in demo_stories(120, 3)]  # plain stories, made here


# ---- derivation -------------------------------------------------------------------------

def test_words_are_a_verb_a_noun_and_an_adjective_of_the_story_in_base_form():
    d = derivable(STORY)
    assert set(d.words["verb"]) == {"run", "kick"}  # "ran", "kicked"
    assert set(d.words["noun"]) == {"boy", "park", "ball", "tree"}
    assert set(d.words["adjective"]) == {"happy", "red", "tall"}
    for seed in range(20):
        verb, noun, adjective = derive_fields(STORY, random.Random(seed), True)["Words"].split(", ")
        assert (verb in VERBS, noun in NOUNS, adjective in ADJECTIVES) == (True, True, True)
        assert uses_all_words(STORY, [verb, noun, adjective])


def test_no_words_line_when_a_part_of_speech_cannot_be_told():
    assert "Words" not in derive_fields("Tom ran to the park. It was far away.",
                                        random.Random(0), every_field=True)  # no adjective
    assert derive_fields("Zork blorp.", random.Random(0), every_field=True) == {}


def test_capitalised_names_are_not_words_of_the_story():
    d = derivable("Rose and Daisy were sad. They walked to the lake.")
    assert "rose" not in d.words["noun"] and "daisy" not in d.words["noun"]
    assert d.words["noun"] == ["lake"]


def test_random_sentence_is_a_quote_free_sentence_of_the_story_verbatim():
    sentences = story_sentences(STORY)
    assert sentences == ["Tom was a happy boy.", "He ran to the park with his red ball.",
                         "He kicked the ball over the tall tree."]
    assert all(s in STORY for s in sentences)
    only_speech = '"Hi there, my friend!" said Tom. "Go!"'
    assert story_sentences(only_speech) == []
    assert "Random sentence" not in derive_fields(only_speech, random.Random(0), True)


def test_dialogue_only_with_quoted_speech():
    assert has_dialogue('He said, "Hello."') and has_dialogue("She said, “Come here!”")
    assert not has_dialogue("Tom's dog didn't bark. It was a 'quiet' dog.")
    assert not has_dialogue('A lone " mark.')
    no_quotes = "The happy dog ran to the big park. The dog played with a ball."
    fields = derive_fields(no_quotes, random.Random(0), every_field=True)
    assert "Features" not in fields and set(fields) == {"Words", "Random sentence"}
    assert derive_fields(STORY, random.Random(0), True)["Features"] == "Dialogue"


def test_no_summary_is_ever_derived():
    for doc in derive_documents(PLAIN, 0, 1.0):
        assert "Summary:" not in doc


def test_derivation_is_deterministic_given_the_seed_and_position_free():
    a = list(derive_documents(PLAIN, 7, 0.8))
    assert a == list(derive_documents(PLAIN, 7, 0.8))
    assert list(derive_documents(PLAIN[::-1], 7, 0.8)) == a[::-1]  # per story, not position
    assert a != list(derive_documents(PLAIN, 8, 0.8))
    assert list(derive_documents(PLAIN, 7, 0.0)) == PLAIN


def test_fields_are_present_at_random_and_each_record_keeps_its_story():
    records = list(derive_documents(PLAIN, 1, 0.8))
    derived = [r for r in records if has_instruct_layout(r)]
    assert 0.6 < len(derived) / len(records) < 0.95  # the rest stay plain stories
    counts = {name: sum(name in parse_record(r)[0] for r in derived) for name in FIELD_CHANCE}
    assert all(0 < n < len(derived) for n in counts.values()), counts
    for record, story in zip(records, PLAIN, strict=True):
        fields, body = parse_record(record)
        assert body == story
        task = Task(fields, body)  # a true story does all its record asks
        assert Checks.of(task, body).all_words in (None, True)
        assert Checks.of(task, body).sentence in (None, True)
        assert Checks.of(task, body).dialogue in (None, True)


def test_real_records_pass_unchanged():
    real = demo_stories(5, 0)
    assert list(derive_documents(real, 0, 1.0)) == real


def test_held_out_stories_are_the_validation_split_and_never_train(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in PLAIN), encoding="utf-8")
    over = [o for o in tiny_overrides(tmp_path) if not o.startswith("data.source")]
    cfg = Config.from_yaml(None, [*over, "data.source=files", f"data.files=[{path}]",
                                  "data.instruct=derive", "data.val_fraction=0.2"])
    data = prepare_data(cfg.data, cfg.train.seed, progress=False)
    held = list(held_out_documents(cfg.data, cfg.train.seed))
    assert 0 < len(held) < len(PLAIN)
    tok = data.tokenizer
    records = list(derive_documents(held, cfg.train.seed, cfg.data.instruct_fraction))
    expected = [i for r in records for i in [*tok.encode(r), tok.eos_id]]
    assert np.array_equal(np.asarray(data.val), expected)
    train_text = tok.decode([int(t) for t in data.train])
    assert not any(story in train_text for story in held)


def test_derivation_off_keeps_the_cache_name(tmp_path):
    over = tiny_overrides(tmp_path)
    plain = prepare_data(Config.from_yaml(None, over).data, 0, progress=False)
    derived = prepare_data(Config.from_yaml(None, [*over, "data.instruct=derive"]).data, 0,
                           progress=False)
    assert plain.path != derived.path
    identity = plain.meta["identity"]
    before = ("version", "source", "files", "tokenizer", "seed", "val_fraction",
              "demo_stories", "max_documents")  # the key's fields before derivation existed
    key = hashlib.sha256(json.dumps({k: identity[k] for k in before},
                                    sort_keys=True).encode()).hexdigest()[:16]
    assert plain.path.name == f"demo-{key}"


# ---- the counting rules ------------------------------------------------------------------

@pytest.mark.parametrize("base,suffix,form", [
    ("run", "ing", "running"), ("big", "er", "bigger"), ("stop", "ed", "stopped"),
    ("cry", "s", "cries"), ("cry", "ed", "cried"), ("cry", "ing", "crying"),
    ("happy", "est", "happiest"), ("bake", "ing", "baking"), ("nice", "er", "nicer"),
    ("box", "s", "boxes"), ("play", "ed", "played"), ("snow", "ing", "snowing"),
    ("open", "ed", "opened"), ("tie", "ing", "tying"), ("see", "ing", "seeing"),
])
def test_suffix_spelling_rules(base, suffix, form):
    assert attach(base, suffix) == form


def test_words_count_inflections_irregulars_any_case_and_punctuation():
    text = "Ben RAN home, crying; the Balls were bigger than the mice's cheese!"
    assert uses_all_words(text, ["run", "cry", "ball", "big", "mouse"])
    assert uses_all_words("A farmer came.", ["farm"])  # -er counts in the eval
    assert not uses_all_words("She cares a lot.", ["car"])  # not a form of car
    assert not uses_all_words("He hoped to win.", ["hop"])  # hop: hopped, not hoped
    assert not uses_all_words("The dog ran.", ["run", "ball"])  # all, not some
    assert uses_all_words("A teddy bear sat.", ["teddy bear"])
    assert "ran" in forms("run") and "better" in forms("good")


def test_derivation_reads_only_each_words_own_forms():
    assert lemma_index()["ran"] == ("run", "verb")
    assert "farmer" not in {f for f, (b, _) in lemma_index().items() if b == "farm"}


def test_random_sentence_must_be_there_verbatim_up_to_whitespace():
    sentence = "He ran to the park with his red ball."
    assert has_sentence("So.  He ran to the\npark with his red ball. Then", sentence)
    assert not has_sentence("he ran to the park with his red ball.", sentence)  # case
    assert not has_sentence("He ran to the park with his red ball", sentence)  # the stop


def test_summary_of_checks_counts_only_what_was_asked():
    task = Task({"Words": "run, ball, happy", "Features": "Dialogue"}, STORY)
    written = ['"Hi!" said the happy girl. She ran after the balls.', "Nothing here."]
    summary = summarize([Checks.of(task, t) for t in written])
    assert summary["all_words"] == 0.5 and summary["all_words_asked"] == 2
    assert summary["dialogue"] == 0.5 and summary["sentence"] is None
    assert summary["sentence_asked"] == 0 and summary["mean_words"] == 6.0


def test_prompts_in_both_styles():
    task = Task({"Features": "Dialogue", "Words": "run, ball, happy",
                 "Random sentence": "Tom was a happy boy."}, STORY)
    assert prompt_text(task, "record") == ("Features: Dialogue\nWords: run, ball, happy\n"
                                           "Random sentence: Tom was a happy boy.\nStory:")
    assert prompt_text(task, "english") == (
        "Write a short story for children that uses the words run, ball and happy. Include "
        'the sentence "Tom was a happy boy." Include dialogue.')


def test_tasks_take_real_records_as_they_are_and_skip_stories_with_nothing_to_ask():
    real = demo_stories(2, 0)
    tasks = tasks_from_documents(["Zork blorp.", *real, STORY], 0, None)
    assert len(tasks) == 3 and tasks[0].fields == parse_record(real[0])[0]
    assert tasks[2].words and tasks[2].sentence and tasks[2].dialogue
    with pytest.raises(UserError, match="no story in the data"):
        tasks_from_documents(["Zork blorp."], 0, None)


# ---- end to end ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct")
    path = root / "plain.txt"
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in PLAIN), encoding="utf-8")
    over = [o for o in tiny_overrides(root) if not o.startswith("data.source")]
    over += ["data.source=files", f"data.files=[{path}]", "data.instruct=derive",
             "data.val_fraction=0.1", "model.max_position=256", f"train.out_dir={root / 'run'}",
             "train.max_steps=4"]
    argv = ["train", "--config", "configs/tiny.yaml"]
    for o in over:
        argv += ["--set", o]
    assert main(argv) == 0
    return root, path


def test_train_on_derived_records_then_eval_instruct(capsys, trained):
    root, path = trained
    capsys.readouterr()
    out = root / "report.json"
    argv = ["eval", "--instruct", "--checkpoint", str(root / "run" / "latest.pt"),
            "--held-out", "--max-stories", "3", "--max-new-tokens", "12", "--json", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "greedy" in table and "sampled" in table and "nats/token" in table
    report = json.loads(out.read_text())
    assert report["prompt_style"] == "record" and len(report["stories"]) == 3
    for decoding in ("greedy", "sampled"):
        row = report[decoding]
        assert row["stories"] == 3 and row["all_words_asked"] >= 1
        assert row["all_words"] is None or 0.0 <= row["all_words"] <= 1.0
    assert report["ce"] > 0 and report["ce_tokens"] > 0
    assert report["stories"][0]["prompt"].endswith("Story:")

    assert main([*argv[:-2], "--json", "--decoding", "greedy", "--prompt-style",
                 "english"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert "sampled" not in again and again["stories"][0]["prompt"].startswith("Write a")


def test_eval_instruct_is_deterministic(capsys, trained):
    root, path = trained
    argv = ["eval", "--instruct", "--checkpoint", str(root / "run" / "latest.pt"),
            "--data", str(path), "--max-stories", "2", "--max-new-tokens", "8", "--json"]
    capsys.readouterr()
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("extra,message", [
    (["--held-out"], "--held-out belongs to --instruct"),
    (["--instruct", "--held-out", "--data", "{data}"], "--held-out reads the run's own data"),
    (["--instruct", "--data", "{data}", "--max-stories", "0"],
     "--max-stories must be positive, got 0"),
    (["--instruct", "--data", "{data}", "--temperature", "-1"], "--temperature"),
    (["--instruct"], "--data FILE is required (or --instruct --held-out)"),
    (["--instruct", "--held-out", "--set", "data.seq_len=8"],
     "--set changes the keys of --config: give --config too"),
    (["--instruct", "--data", "{data}", "--json", "/no/such/dir/r.json"],
     "--json /no/such/dir/r.json: its folder does not exist"),
])
def test_bad_instruct_arguments(capsys, trained, extra, message):
    root, path = trained
    argv = ["eval", "--checkpoint", str(root / "run" / "latest.pt"),
            *(e.format(data=path) for e in extra)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_hf_backend_writes_and_scores(tmp_path, smollm2_tokenizer):
    transformers = pytest.importorskip("transformers", reason="the --hf-model route needs it")
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(smollm2_tokenizer.path),
                                               eos_token="<|endoftext|>")
    backend = HFBackend(model, tok, 0, Decoding(max_new_tokens=6), chat=False)
    tasks = tasks_from_documents([STORY], 0, None)
    report = run_instruct_eval(tasks, backend, "record", ("greedy", "sampled"), 0,
                               progress=False)
    assert report.results["greedy"]["stories"] == 1 and report.ce_tokens > 10
    again = run_instruct_eval(tasks, backend, "record", ("greedy", "sampled"), 0,
                              progress=False)
    assert again.stories == report.stories


def test_loss_eval_json_file_writes_it_and_prints_the_table(capsys, trained, tmp_path):
    root, path = trained
    out = tmp_path / "loss.json"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(root / "run" / "latest.pt"), "--data", str(path),
                 "--max-tokens", "64", "--json", str(out)]) == 0
    assert "nats/token" in capsys.readouterr().out
    assert json.loads(out.read_text())["tokens"] == 64
