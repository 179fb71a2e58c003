"""Edit formats: parsing replies and applying SEARCH/REPLACE blocks (pure, no I/O)."""

from __future__ import annotations

import pytest

from autoresearch_cli.agents.edits import (
    EditError,
    apply_blocks,
    check_whole_file,
    closest_lines,
    describe_change,
    filename_of,
    parse_reply,
)

TRAIN_PY = '''\
"""A tiny train.py."""

import math

DEPTH = 8  # number of layers
MATRIX_LR = 0.04  # learning rate for matrices


def lr_schedule(progress):
    if progress < 0.5:
        return 1.0

    return 1.0 - progress


def main():
    for step in range(10):
        loss = math.exp(-step)
        print(loss)
'''


def block(search: str, replace: str, filename: str | None = "train.py") -> str:
    header = f"{filename}\n" if filename else ""
    return f"{header}<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE\n"


# --- applying ------------------------------------------------------------------------------


def test_exact_match_replaces_only_that_line():
    result = apply_blocks(TRAIN_PY, [("MATRIX_LR = 0.04  # learning rate for matrices",
                                      "MATRIX_LR = 0.05  # learning rate for matrices")])
    assert "MATRIX_LR = 0.05  # learning rate for matrices\n" in result
    assert result.replace("0.05", "0.04") == TRAIN_PY


def test_blocks_apply_in_order_to_the_running_result():
    result = apply_blocks(TRAIN_PY, [("DEPTH = 8  # number of layers", "DEPTH = 9  # number of layers"),
                                     ("DEPTH = 9  # number of layers", "DEPTH = 10  # number of layers")])
    assert "DEPTH = 10  # number of layers" in result


def test_search_with_lost_indentation_is_reindented():
    search = "for step in range(10):\n    loss = math.exp(-step)"
    replace = "for step in range(20):\n    loss = math.exp(-step / 2)"
    result = apply_blocks(TRAIN_PY, [(search, replace)])
    assert "    for step in range(20):\n        loss = math.exp(-step / 2)\n        print(loss)" in result


def test_search_with_extra_indentation_is_dedented():
    search = "        DEPTH = 8  # number of layers"
    result = apply_blocks(TRAIN_PY, [(search, "        DEPTH = 6  # number of layers")])
    assert "\nDEPTH = 6  # number of layers\n" in result


def test_whitespace_only_line_differences_are_tolerated():
    search = "    if progress < 0.5:\n        return 1.0\n    return 1.0 - progress   "
    replace = "    if progress < 0.3:\n        return 1.0\n    return 0.5"
    result = apply_blocks(TRAIN_PY, [(search, replace)])
    assert "    if progress < 0.3:\n        return 1.0\n    return 0.5\n" in result
    assert "1.0 - progress" not in result


def test_no_match_names_the_block_and_shows_the_closest_lines():
    blocks = [("DEPTH = 8  # number of layers", "DEPTH = 9  # number of layers"),
              ("MATRIX_LR = 0.4  # learning rate for matrix", "MATRIX_LR = 0.05")]
    with pytest.raises(EditError) as caught:
        apply_blocks(TRAIN_PY, blocks)
    message = str(caught.value)
    assert message.startswith("SEARCH block 2 did not match train.py; the closest lines were:")
    assert "MATRIX_LR = 0.04  # learning rate for matrices" in message


def test_no_match_says_when_the_replacement_is_already_there():
    with pytest.raises(EditError, match="already in train.py"):
        apply_blocks(TRAIN_PY, [("DEPTH = 7", "DEPTH = 8  # number of layers")])


def test_search_matching_twice_is_an_error():
    original = "def f():\n    x = 1\n    return x\n\n\ndef g():\n    x = 1\n    return -x\n"
    with pytest.raises(EditError, match=r"SEARCH block 1 matches train.py in 2 places \(lines 2, 7\)"):
        apply_blocks(original, [("    x = 1", "    x = 2")])
    # a neighbouring line makes it unique
    result = apply_blocks(original, [("    x = 1\n    return -x", "    x = 2\n    return -x")])
    assert result.count("x = 1") == 1 and "x = 2\n    return -x" in result


def test_empty_search_only_fills_an_empty_file():
    with pytest.raises(EditError, match="SEARCH block 1 is empty"):
        apply_blocks(TRAIN_PY, [("", "print('hi')")])
    assert apply_blocks("", [("", "print('hi')")]) == "print('hi')\n"


def test_closest_lines_finds_the_most_similar_window():
    lines = TRAIN_PY.splitlines()
    assert closest_lines(lines, ["def lr_schedul(progres):"]) == ["def lr_schedule(progress):"]


# --- parsing -------------------------------------------------------------------------------


def test_parse_search_replace_reply_with_description():
    reply = ("I will raise the learning rate.\n\nDescription: raise MATRIX_LR to 0.05\n\n"
             + block("MATRIX_LR = 0.04", "MATRIX_LR = 0.05"))
    parsed = parse_reply(reply)
    assert parsed.description == "raise MATRIX_LR to 0.05"
    assert parsed.blocks == [("MATRIX_LR = 0.04", "MATRIX_LR = 0.05")]
    assert parsed.whole_file is None and parsed.other_files == []


def test_parse_blocks_inside_fences_and_markdown_description():
    reply = ("**Description:** deeper model\n\n```python\ntrain.py\n<<<<<<< SEARCH\nDEPTH = 8"
             "\n=======\nDEPTH = 9\n>>>>>>> REPLACE\n```\n\n`train.py`\n```python\n<<<<<<< SEARCH"
             "\nMATRIX_LR = 0.04\n=======\nMATRIX_LR = 0.03\n>>>>>>> REPLACE\n```\n")
    parsed = parse_reply(reply)
    assert parsed.description == "deeper model"
    assert parsed.blocks == [("DEPTH = 8", "DEPTH = 9"), ("MATRIX_LR = 0.04", "MATRIX_LR = 0.03")]
    assert parsed.other_files == []


def test_parse_whole_file_fence():
    reply = "Description: rewrite\n\nHere is the new train.py:\n\n```python\nDEPTH = 9\n```\n"
    parsed = parse_reply(reply)
    assert parsed.blocks == []
    assert parsed.whole_file == "DEPTH = 9\n"


def test_whole_file_is_the_longest_python_fence():
    reply = ("Description: x\n```python\nDEPTH = 9\n```\nThe full file:\n```python\n"
             "import math\nDEPTH = 9\n```\n```bash\npython train.py\n```\n")
    assert parse_reply(reply).whole_file == "import math\nDEPTH = 9\n"


@pytest.mark.parametrize("reply", [
    block("DEPTH = 8", "DEPTH = 9", filename="prepare.py"),
    block("DEPTH = 8", "DEPTH = 9") + "\n" + block("x = 1", "x = 2", filename="prepare.py"),
    "Description: x\n\nprepare.py\n```python\nMAX_SEQ_LEN = 4096\n```\n",
    "Description: x\n\n```python prepare.py\nMAX_SEQ_LEN = 4096\n```\n",
    "Description: x\n\n**ar.toml**:\n```toml\n[profile]\ntime_budget = 9999\n```\n",
])
def test_edits_to_other_files_are_detected(reply):
    parsed = parse_reply(reply)
    assert parsed.other_files
    assert parsed.other_files[0] in ("prepare.py", "ar.toml")


def test_blocks_without_a_filename_inherit_the_previous_one():
    reply = block("a = 1", "a = 2", filename="program.md") + block("b = 1", "b = 2", filename=None)
    parsed = parse_reply(reply)
    assert parsed.blocks == [] and parsed.other_files == ["program.md"]


def test_paths_to_train_py_count_as_train_py():
    parsed = parse_reply(block("a = 1", "a = 2", filename="./workspace/train.py"))
    assert parsed.blocks == [("a = 1", "a = 2")] and parsed.other_files == []


def test_prose_mentioning_files_is_not_a_filename():
    reply = ("Description: x\nI will not touch prepare.py, only train.py:\n"
             + block("a = 1", "a = 2", filename=None))
    parsed = parse_reply(reply)
    assert parsed.blocks == [("a = 1", "a = 2")] and parsed.other_files == []


def test_reply_without_edits():
    parsed = parse_reply("Description: nothing\n\nI think the model is already perfect.")
    assert not parsed.has_edits and parsed.description == "nothing"
    assert parse_reply("").description is None


def test_unclosed_block_is_an_edit_error():
    with pytest.raises(EditError, match="no >>>>>>> REPLACE"):
        parse_reply("<<<<<<< SEARCH\na = 1\n=======\na = 2\n")
    with pytest.raises(EditError, match="no ======="):
        parse_reply("<<<<<<< SEARCH\na = 1\n")


def test_filename_of():
    assert filename_of("train.py") == "train.py"
    assert filename_of("**prepare.py**:") == "prepare.py"
    assert filename_of("File: ar.toml") == "ar.toml"
    assert filename_of("# train.py") == "train.py"
    assert filename_of("see train.py") is None
    assert filename_of("0.5") is None


# --- whole files and descriptions -------------------------------------------------------------


def test_whole_file_that_elides_code_is_rejected():
    with pytest.raises(EditError, match="leaves code out"):
        check_whole_file(TRAIN_PY, "DEPTH = 9\n# ... rest of the file unchanged\n")


def test_whole_file_much_shorter_than_train_py_is_rejected():
    original = "".join(f"X{i} = {i}\n" for i in range(60))
    with pytest.raises(EditError, match="has 3 lines but train.py has 60"):
        check_whole_file(original, "X1 = 1\nX2 = 2\nX3 = 3\n")
    assert check_whole_file(original, original.replace("X1 = 1", "X1 = 2")).startswith("X0 = 0")


def test_describe_change_of_constants_and_of_code():
    new = TRAIN_PY.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.05")
    assert describe_change(TRAIN_PY, new) == "MATRIX_LR 0.04 -> 0.05"
    code = TRAIN_PY.replace("return 1.0 - progress", "return (1.0 - progress) ** 2")
    assert describe_change(TRAIN_PY, code).startswith("edit 1 lines -> 1 lines: return (1.0")
