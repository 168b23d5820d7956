"""Pure metric functions: GSM8K extraction protocols, ViGGO exact/slot F1, SQL exact, protocols."""
import pytest

from rosa_peft.eval import metrics
from rosa_peft.eval.generate import truncate_at_stop
from rosa_peft.eval.protocols import GSM8K_PAPER_STOP, get_protocol
from rosa_peft.tasks import Example

GOLD = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 1,072"


# ---- GSM8K --------------------------------------------------------------------------------------
def test_gsm8k_paper_commas_negatives_and_first_match():
    assert metrics.gsm8k_extract("so #### 1,072", "paper") == "1072"
    assert metrics.gsm8k_extract("loss is #### -5", "paper") == "-5"
    assert metrics.gsm8k_extract("#### 3.50\n#### 7", "paper") == "3.50"  # first match
    assert metrics.gsm8k_gold(GOLD, "paper") == "1072"
    pred, gold, ok = metrics.gsm8k_correct("48 + 1024 = 1072\n#### 1,072", GOLD, "paper")
    assert (pred, gold, ok) == ("1072", "1072", True)


def test_gsm8k_missing_hashes_is_wrong_in_every_protocol():
    assert metrics.gsm8k_extract("The answer is 72.", "paper") is None
    assert metrics.gsm8k_extract("The answer is 72.", "strict") is None
    assert metrics.gsm8k_correct("The answer is 1072.", GOLD, "paper")[2] is False
    assert metrics.gsm8k_correct("The answer is 1072.", GOLD, "strict")[2] is False
    # flexible takes the last number-like string, so the same text is right there
    assert metrics.gsm8k_correct("The answer is 1,072.", GOLD, "flexible") == ("1072", "1072", True)
    assert metrics.gsm8k_extract("no digits at all", "flexible") is None


def test_gsm8k_paper_stops_at_colon_before_the_answer():
    """The 2023 harness cut generation at ':', so '#### N' after a colon is never seen."""
    generation = " She earns 3 * 4 = 12 dollars per day. Total: 12 * 7 = 84\n#### 84"
    cut = truncate_at_stop(generation, GSM8K_PAPER_STOP)
    assert cut == " She earns 3 * 4 = 12 dollars per day. Total"
    assert metrics.gsm8k_extract(cut, "paper") is None
    gold = "...\n#### 84"
    assert metrics.gsm8k_correct(cut, gold, "paper")[2] is False
    # without a colon the whole answer survives
    ok = " 12 * 7 = <<12*7=84>>84\n#### 84\n\nQuestion: next"
    assert metrics.gsm8k_correct(truncate_at_stop(ok, GSM8K_PAPER_STOP), gold, "paper")[2] is True


def test_gsm8k_paper_is_strict_about_trailing_dot_but_harness_is_not():
    assert metrics.gsm8k_correct("#### 84.", "#### 84", "paper")[2] is False
    assert metrics.gsm8k_correct("#### 84.", "#### 84", "strict")[2] is True
    assert metrics.gsm8k_correct("#### $1,084", "#### 1084", "flexible")[2] is True


def test_gsm8k_unknown_protocol():
    with pytest.raises(ValueError, match="unknown gsm8k protocol 'lenient'"):
        metrics.gsm8k_extract("#### 1", "lenient")


def test_gsm8k_eval_prompt_differs_from_training_prompt():
    proto = get_protocol("gsm8k")
    ex = Example(prompt="How many?", response=GOLD, meta={"answer": GOLD, "question": "How many?"})
    assert proto.prompt(ex) == "Question: How many?\nAnswer:"
    assert proto.stop == (":", "Question:", "Question") and proto.add_special_tokens is False
    assert get_protocol("gsm8k", gsm8k_protocol="strict").stop == ("Question:", "</s>", "<|im_end|>")


# ---- ViGGO --------------------------------------------------------------------------------------
MR = "inform(name[Dirt: Showdown], release_year[2012], genres[driving/racing, sport], has_mac_release[no])"
REORDERED = "inform(release_year[2012], name[Dirt: Showdown], has_mac_release[no], genres[sport, driving/racing])"


def test_viggo_exact_vs_slot_f1_on_reordered_attributes():
    assert metrics.viggo_exact(MR, MR)
    assert not metrics.viggo_exact(REORDERED, MR)
    assert metrics.viggo_slot_f1(REORDERED, MR) == 1.0


def test_viggo_slot_f1_partial_and_wrong_act():
    pred = "inform(name[Dirt: Showdown], release_year[2013])"
    # pred items: da, name, year(wrong) = 3; gold: da, name, year, 2 genres, mac = 6; overlap 2
    p, r = 2 / 3, 2 / 6
    assert metrics.viggo_slot_f1(pred, MR) == pytest.approx(2 * p * r / (p + r))
    assert metrics.viggo_slot_f1("request" + MR[len("inform"):], MR) == pytest.approx(2 * (5 / 6) * (5 / 6) / (10 / 6))
    assert metrics.viggo_slot_f1("no idea", MR) == 0.0


def test_viggo_extract_first_line_after_marker():
    prompt = "instr\n\n### Target sentence:\nDirt...\n\n### Meaning representation:\n"
    assert metrics.viggo_extract(prompt + "  " + MR + "  \nextra line") == MR
    assert metrics.viggo_exact(prompt + MR + "\ninform(x[y])", MR + "  ")
    assert metrics.viggo_extract(MR + "\nsecond") == MR  # generation only
    proto = get_protocol("viggo")
    rec = proto.score(Example("p", MR, {"meaning_representation": MR}), REORDERED)
    assert rec["correct"] is False and rec["slot_f1"] == 1.0 and proto.stop == ("\n",)


# ---- SQL exact ----------------------------------------------------------------------------------
def test_sql_exact_paper_regex():
    gold = "SELECT route_via FROM table_1 WHERE train_name = 'Parasuram Express'"
    assert metrics.sql_exact("  " + gold + "  \nSELECT other", gold)
    assert metrics.sql_extract("answer: SELECT a FROM t\nmore") == "SELECT a FROM t"
    assert not metrics.sql_exact(gold.lower(), gold)  # the paper's regex needs uppercase 'SELECT '
    assert metrics.sql_extract("nothing") == ""
    assert metrics.sql_extract("select a from t", paper=False) == "select a from t"
    assert metrics.sql_exact_nocase(gold + ";", gold.lower())


def test_sql_paper_prompt_quirk_is_opt_in():
    ex = Example(prompt="Write...\n\n question: q?\n\n answer: ", response="SELECT 1", meta={"gold_sql": "SELECT 1"})
    assert get_protocol("sql").prompt(ex) == ex.prompt
    assert get_protocol("sql", sql_paper_prompt=True).prompt(ex).endswith("\n\n answer: \n\n answer: ")
    rec = get_protocol("sql").score(ex, "SELECT 1")
    assert rec["correct"] is True and rec["execution"] is None  # no tables: exact match decides


def test_get_protocol_rejects_unknown_task_and_bad_bounds():
    with pytest.raises(ValueError, match="task 'nope' has no evaluation protocol"):
        get_protocol("nope")
    for bad in (float("nan"), float("inf"), 0, -1.0):
        with pytest.raises(ValueError, match="sql_timeout"):
            get_protocol("sql", sql_timeout_s=bad)
    with pytest.raises(ValueError, match="max_new_tokens"):
        get_protocol("viggo", max_new_tokens=0)
    assert get_protocol("sql-synth", max_new_tokens=5, stop=["\n\n"]).max_new_tokens == 5
