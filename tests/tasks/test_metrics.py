"""OSWorld's metric functions as agentenv runs them (desktop-env's modules, and ours written from their
rules), on real files; the command adaptation for desktops that are not OSWorld's VM."""

from __future__ import annotations

import json
from pathlib import Path

import openpyxl
import pytest

from agentenv.envs.tasks import commands, metrics
from agentenv.envs.tasks.evaluate import EvaluatorError, evaluate, validate_evaluator
from agentenv.envs.tasks.getters import EvalContext, read_sheet_cells
from agentenv.types import Task


def _xlsx(path: Path, rows: list[tuple], title: str = "Sheet1") -> str:
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = title
    for r in rows:
        ws.append(list(r))
    wb.save(path)
    return str(path)


def test_desktop_env_metrics_load_without_its_pinned_stack():
    import subprocess
    import sys

    # In a fresh interpreter: other tests of the session import torch themselves.
    probe = """
import sys
from agentenv.envs.tasks import osworld_lib
fns = osworld_lib.load()
for name in ("compare_table", "compare_csv", "exact_match", "check_include_exclude", "is_in_list",
             "check_line_number", "check_json_settings", "check_json_keybindings", "compare_text_file",
             "compare_config", "check_moved_jpgs", "compare_pptx_files", "check_image_mirror", "is_vlc_playing",
             "check_thunderbird_prefs", "check_pdf_pages", "check_mp3_meta", "compare_epub",
             "is_expected_bookmarks", "is_expected_tabs", "compare_pdfs"):
    assert name in fns, name
    assert fns[name].__module__.startswith("desktop_env.evaluators.metrics."), fns[name].__module__
assert "torch" not in sys.modules and "easyocr" not in sys.modules, "the pinned stack was imported"
# the package's own __init__ (which imports every domain) never ran
assert not getattr(sys.modules["desktop_env.evaluators.metrics"], "__file__", None)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_compare_table_rules(tmp_path):
    ct = metrics.osworld_metric("compare_table")
    gold = _xlsx(tmp_path / "gold.xlsx", [("region", "amount"), ("north", 10), ("total", 10.5)])
    same = _xlsx(tmp_path / "same.xlsx", [("region", "amount"), ("north", 10), ("total", 10.50001)])
    other = _xlsx(tmp_path / "other.xlsx", [("region", "amount"), ("north", 10), ("total", 11)])
    renamed = _xlsx(tmp_path / "renamed.xlsx", [("region", "amount"), ("north", 10), ("total", 10)], "Data")
    data = {"rules": [{"type": "sheet_data", "sheet_idx0": 0, "sheet_idx1": "EI0"}]}
    assert ct(same, gold, **data) == 1.0  # precision 4 by default: 10.50001 rounds to 10.5
    assert ct(other, gold, **data) == 0.0
    assert ct(None, gold, **data) == 0.0 and ct(str(tmp_path / "absent.xlsx"), gold, **data) == 0.0
    names = {"rules": [{"type": "sheet_name"}]}
    assert ct(same, gold, **names) == 1.0 and ct(renamed, gold, **names) == 0.0
    # check_cell: a cell's value against a rule, no gold file
    cell = {"rules": [{"type": "check_cell", "sheet_idx": 0, "coordinate": "B3",
                       "props": {"value": {"method": "eq", "ref": 10.5}}}]}
    assert ct(same.replace("same", "gold"), **cell) == 1.0 and ct(other, **cell) == 0.0


def test_text_and_rule_metrics_follow_osworld(tmp_path):
    m = metrics.osworld_metric
    # OSWorld's exact_match is exact: the trailing newline a command prints counts
    assert m("exact_match")("yes\n", {"expected": "yes\n"}) == 1.0
    assert m("exact_match")("yes", {"expected": "yes\n"}) == 0.0
    assert m("check_include_exclude")("total: 54\n", {"include": ["54\n"], "exclude": ["error"]}) == 1.0
    assert m("check_include_exclude")("54\nerror", {"include": ["54"], "exclude": ["error"]}) == 0.0
    assert m("is_in_list")(["a", "b"], {"expected": "b"}) == 1.0 and m("is_in_list")(["a"], {"expected": "b"}) == 0.0
    log = tmp_path / "log.txt"
    log.write_text("12:00:01 start\nno time here\n23:59:59 end\n")
    assert m("check_line_number")(str(log), {"expected": "2"}) == 1
    assert m("check_line_number")(str(log), {"expected": "3"}) == 0
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("Hello\tworld\n")
    b.write_text("hello world")
    assert m("compare_text_file")(str(a), str(b)) == 0.0
    assert m("compare_text_file")(str(a), str(b), ignore_blanks=True, ignore_case=True) == 1.0
    assert m("compare_config")(str(b), {"expected": "hello world"}) == 1.0
    assert m("compare_config")(str(a), {"expected": "hello world"}) == 0.0
    csv1, csv2 = tmp_path / "r.csv", tmp_path / "e.csv"
    csv1.write_text("a,b\n1,2\n")
    csv2.write_text("a,b\n1,2\n")
    assert m("compare_csv")(str(csv1), str(csv2)) == 1.0
    csv2.write_text("a,b\n1,3\n")
    assert m("compare_csv")(str(csv1), str(csv2)) == 0.0


def test_vscode_settings_and_keybindings(tmp_path):
    m = metrics.osworld_metric
    s = tmp_path / "settings.json"
    s.write_text(json.dumps({"editor.fontSize": 16, "files.autoSave": "off"}))
    assert m("check_json_settings")(str(s), {"expected": {"editor.fontSize": 16}}) == 1.0
    assert m("check_json_settings")(str(s), {"expected": {"editor.fontSize": 14}}) == 0.0
    assert m("check_json_settings")(None, {"expected": {"editor.fontSize": 16}}) == 0.0
    k = tmp_path / "keybindings.json"
    k.write_text("// comment line VS Code writes\n" + json.dumps([{"key": "ctrl+j", "command": "workbench.action.togglePanel"}]))
    rule = {"expected": {"key": "ctrl+j", "command": "workbench.action.togglePanel"}}
    assert m("check_json_keybindings")(str(k), rule) == 1.0
    assert m("check_json_keybindings")(str(k), {"expected": {"key": "ctrl+k", "command": "x"}}) == 0.0


def test_compare_docx_files_is_osworlds_own(tmp_path):
    import docx
    from odf.opendocument import OpenDocumentText
    from odf.text import P, S

    def d(name: str, paras: list[str]) -> str:
        doc = docx.Document()
        for p in paras:
            doc.add_paragraph(p)
        doc.save(tmp_path / name)
        return str(tmp_path / name)

    cmp = metrics.osworld_metric("compare_docx_files")
    gold = d("gold.docx", ["Quarterly Report", "Numbers are up."])
    assert cmp(d("a.docx", ["Quarterly Report", "Numbers are up."]), gold) == 1.0
    assert cmp(d("b.docx", ["quarterly report", "Numbers are up."]), gold) == 0.0
    assert cmp(d("c.docx", ["quarterly report", "Numbers are up."]), gold, ignore_case=True) == 1.0
    assert cmp(d("d.docx", ["Quarterly   Report", "Numbers are up."]), gold) == 1.0  # ignore_blanks default
    assert cmp(d("e.docx", ["Quarterly   Report", "Numbers are up."]), gold, ignore_blanks=False) == 0.0
    assert cmp(gold, str(tmp_path / "x.odt")) == 0.0  # types differ
    # .odt through odfpy: <text:s/> is a space, kept
    for name, words in (("r.odt", ["two", "words"]), ("g.odt", ["two", "words"])):
        doc = OpenDocumentText()
        p = P(text=words[0])
        p.addElement(S())
        p.addText(words[1])
        doc.text.addElement(p)
        doc.save(str(tmp_path / name))
    assert cmp(str(tmp_path / "r.odt"), str(tmp_path / "g.odt"), ignore_blanks=False) == 1.0
    assert cmp.__module__ == "desktop_env.evaluators.metrics.docs"


def test_sheet_reader_keeps_spaces_dates_and_booleans(tmp_path):
    from odf.opendocument import OpenDocumentSpreadsheet
    from odf.table import Table, TableCell, TableRow
    from odf.text import P, S

    doc = OpenDocumentSpreadsheet()
    t = Table(name="S")
    row = TableRow()
    c = TableCell(valuetype="string")
    p = P(text="a")
    p.addElement(S(c=2))
    p.addText("b")
    c.addElement(p)
    row.addElement(c)
    row.addElement(TableCell(valuetype="date", datevalue="2024-03-05"))
    b = TableCell(valuetype="boolean", booleanvalue="true")
    b.addElement(P(text="TRUE"))  # as LibreOffice writes it
    row.addElement(b)
    row.addElement(TableCell(valuetype="float", value="12.5"))
    t.addElement(row)
    doc.spreadsheet.addElement(t)
    doc.save(str(tmp_path / "s.ods"))
    cells = read_sheet_cells(tmp_path / "s.ods")["S"]
    assert cells == {"A1": "a  b", "B1": "2024-03-05", "C1": "TRUE", "D1": "12.5"}


def test_refused_metrics_and_getters_name_what_is_missing():
    os_ev = {"func": "compare_pptx_files", "result": {"type": "vm_file", "path": "a.pptx", "dest": "a.pptx"}}
    validate_evaluator(os_ev, "osworld")  # desktop-env's slides.py loads (python-pptx)
    with pytest.raises(EvaluatorError, match="OCR with easyocr"):
        validate_evaluator({**os_ev, "func": "compare_image_text"}, "osworld")
    with pytest.raises(EvaluatorError, match="runs a task's Python code"):
        validate_evaluator({**os_ev, "func": "check_python_file_by_test_suite"}, "osworld")
    with pytest.raises(EvaluatorError, match="Google Drive"):  # desktop-env's other Chrome getters are offered
        validate_evaluator({"func": "compare_pdfs", "result": {"type": "googledrive_file"}}, "osworld")
    validate_evaluator({"func": "is_expected_tabs", "result": {"type": "open_tabs_info"}}, "osworld")
    a11y = {"func": "check_accessibility_tree", "result": {"type": "accessibility_tree"},
            "expected": {"type": "rule", "rules": [{"xpath": "//application"}]}}
    validate_evaluator(a11y, "osworld")  # offered: a sandboxed desktop has the tree, a plain one says what it lacks
    plain = Task(id="a", instruction="-", extra={"snapshot": "os"}, evaluator=a11y)
    with pytest.raises(EvaluatorError, match="AT-SPI accessibility tree.*not sandboxed"):
        evaluate(_Plain(), plain)
    with pytest.raises(EvaluatorError, match="unknown metric 'no_such_metric'"):
        validate_evaluator({**os_ev, "func": "no_such_metric"}, "osworld")
    with pytest.raises(EvaluatorError, match="no 'func'"):
        validate_evaluator({"func": "", "result": {}}, "osworld")


def test_relative_dates_are_osworlds_and_leave_the_task_unchanged():
    from datetime import datetime, timedelta

    from agentenv.envs.tasks.app_getters import APP_GETTERS

    ctx = EvalContext(desktop=_NoDesktop(), task=Task(id="r", instruction="-"), tmp=Path("."))
    spec = {"type": "rule_relativeTime", "rules": {"relativeTime": {"from": "tomorrow"},
                                                   "expected": {"start": "NYC", "time": "{Year}-{Month0D}-{Day0D}"}}}
    before = json.dumps(spec)
    rules = APP_GETTERS["rule_relativeTime"](ctx, spec)  # desktop-env's getters/misc.py
    tomorrow = (datetime.now() + timedelta(days=1)).strftime("%Y-%m-%d")
    assert rules["expected"] == {"start": "NYC", "time": tomorrow} and json.dumps(spec) == before
    assert APP_GETTERS["time_diff_range"](ctx, {"diff_range_in_minutes": "60"}) == "60"


class _NoDesktop:
    """Evaluators that read nothing from a desktop (infeasible, rule-only) need none."""


class _Plain:
    """A plain desktop as the accessibility_tree getter sees it: no tree."""

    def accessibility_tree(self):
        return None


def test_check_accessibility_tree_scores_osworlds_xml():
    # OSWorld's metric (desktop-env's general.py) on a tree in the format /accessibility answers
    from agentenv.envs.tasks import metrics

    fn = metrics.osworld_metric("check_accessibility_tree")
    st = "https://accessibility.ubuntu.example.org/ns/state"
    xml = (f'<desktop-frame xmlns:st="{st}"><application name="mousepad"><frame name="notes.txt - Mousepad" '
           f'st:active="true"><text>meeting at noon</text></frame></application></desktop-frame>')
    assert fn(xml, [{"xpath": '//application[@name="mousepad"]/frame[@st:active="true"]//text',
                     "text": "meeting at noon", "exact": True}]) == 1.0
    assert fn(xml, [{"selectors": ['application[name="mousepad"] text'], "text": "meeting at night",
                     "exact": True}]) == 0.0


def test_infeasible_and_giving_up_follow_osworld():
    inf = Task(id="i", instruction="-", evaluator={"func": "infeasible"}, extra={"snapshot": "os"})
    assert evaluate(_NoDesktop(), inf, "call_user") == 1.0
    assert evaluate(_NoDesktop(), inf, "FAIL") == 1.0
    assert evaluate(_NoDesktop(), inf, "finished") == 0.0 and evaluate(_NoDesktop(), inf, None) == 0.0
    # a feasible OSWorld task the agent gave up on scores 0 before anything is read
    feasible = Task(id="f", instruction="-", extra={"snapshot": "os"}, evaluator={
        "func": "exact_match", "result": {"type": "rule", "rules": "x"}, "expected": {"type": "rule", "rules": {"expected": "x"}}})
    assert evaluate(_NoDesktop(), feasible, None) == 1.0
    assert evaluate(_NoDesktop(), feasible, "call_user") == 0.0


def test_conj_and_or_over_lists():
    def task(conj: str, values: list[str]) -> Task:
        return Task(id="c", instruction="-", extra={"snapshot": "os"}, evaluator={
            "func": ["exact_match"] * len(values), "conj": conj,
            "result": [{"type": "rule", "rules": v} for v in values],
            "expected": [{"type": "rule", "rules": {"expected": "ok"}}] * len(values)})

    assert evaluate(_NoDesktop(), task("and", ["ok", "ok"])) == 1.0
    assert evaluate(_NoDesktop(), task("and", ["ok", "no"])) == 0.0
    assert evaluate(_NoDesktop(), task("or", ["no", "ok"])) == 1.0
    assert evaluate(_NoDesktop(), task("or", ["no", "no"])) == 0.0


class _Home:
    home = Path("/tmp/agentenv-desktops/d1/home")


class _OSWorldLike(_Home):
    osworld_like = True


def test_commands_are_adapted_unless_the_desktop_looks_like_osworld():
    home = str(_Home.home)
    assert commands.adapt(_Home(), "echo password | sudo -S mkdir -p /home/user/Desktop/p", True) == \
        f"mkdir -p {home}/Desktop/p"
    assert commands.adapt(_Home(), "echo 'password' | sudo -S -k apt-get update && python x.py", True) == \
        "apt-get update && python3 x.py"
    assert commands.adapt(_Home(), ["sudo", "-S", "python", "/home/user/a.py", "/home/username"], False) == \
        ["python3", f"{home}/a.py", "/home/username"]
    assert commands.adapt(_Home(), "cat ~/python.txt /usr/bin/python3", True) == "cat ~/python.txt /usr/bin/python3"
    same = "echo password | sudo -S mkdir /home/user/x"
    assert commands.adapt(_OSWorldLike(), same, True) == same
    assert commands.map_path(_Home(), "/home/user") == home and commands.map_path(_OSWorldLike(), "/home/user") == "/home/user"
    code = "import pyautogui; pyautogui.hotkey('ctrl', 's')"
    assert commands.pyautogui_code(["python", "-c", code]) == code
    assert commands.pyautogui_code(f'python3 -c "{code}"') == code
    assert commands.pyautogui_code(["python", "-c", "print(1)"]) is None
    assert commands.shell_flag("true", "x") is True and commands.shell_flag("false", "x") is False
    assert commands.program("echo password | sudo -S apt-get install -y x", True) == "apt-get"


class _Recorder:
    """A stand-in desktop that records the commands it is asked to run (pure logic of the step)."""

    width, height = 1280, 800
    home = Path("/tmp/agentenv-desktops/d1/home")

    def __init__(self, osworld_like: bool):
        self.osworld_like = osworld_like
        self.ran: list = []

    def run(self, argv, timeout=60.0, shell=False):
        import subprocess

        self.ran.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")


def test_refused_pyautogui_code_runs_as_code_only_on_an_osworld_like_desktop():
    from agentenv.envs.tasks.setup import TaskSetupError, run_setup

    code = "import pyautogui; import os; os.system('ls')"
    task = Task(id="t", instruction="-", config=[{"type": "execute", "parameters": {"command": ["python", "-c", code]}}])
    plain = _Recorder(osworld_like=False)
    with pytest.raises(TaskSetupError, match="refused pyautogui code"):
        run_setup(plain, task)
    assert plain.ran == []
    vm = _Recorder(osworld_like=True)
    run_setup(vm, task)
    assert vm.ran == [["python", "-c", code]]  # unchanged: `python`, as OSWorld's VM runs it


def test_docx_tables_spacing_and_new_lines_on_osworld_rules(tmp_path):
    import docx

    def d(name: str, paras: list[str], table: list[list[str]] | None = None, spacing: float | None = None) -> str:
        doc = docx.Document()
        for p in paras:
            para = doc.add_paragraph(p)
            if spacing is not None:
                para.paragraph_format.line_spacing = spacing
        if table:
            t = doc.add_table(rows=len(table), cols=len(table[0]))
            for i, row in enumerate(table):
                for j, v in enumerate(row):
                    t.cell(i, j).text = v
        doc.save(tmp_path / name)
        return str(tmp_path / name)

    m = metrics.osworld_metric
    gold = d("g.docx", ["Sales"], [["a", "1"], ["b", "2"]])
    assert m("compare_docx_tables")(d("r1.docx", ["other text"], [["a ", "1"], ["b", "2"]]), gold) == 1.0
    assert m("compare_docx_tables")(d("r2.docx", ["Sales"], [["a", "1"], ["b", "3"]]), gold) == 0.0
    assert m("compare_docx_tables")(d("r3.docx", ["Sales"], [["a", "1", "x"], ["b", "2", "y"]]), gold) == 0.0
    assert m("compare_docx_tables")(None, gold) == 0.0
    double = d("s2.docx", ["One", "Two"], spacing=2.0)
    assert m("compare_line_spacing")(d("s2b.docx", ["One", "Two"], spacing=2.0), double) == 1.0
    assert m("compare_line_spacing")(d("s1.docx", ["One", "Two"], spacing=1.0), double) == 0.0
    assert m("compare_line_spacing")(d("s2c.docx", ["One", "Three"], spacing=2.0), double) == 0.0
    lines = d("l.docx", ["One", "", "Two"])
    assert m("compare_docx_files_and_ignore_new_lines")(d("l2.docx", ["One", "Two"]), lines) == 1.0
    assert m("compare_docx_files_and_ignore_new_lines")(d("l3.docx", ["One", "Two!"]), lines) == 0.0
    assert m("compare_docx_files_and_ignore_new_lines")(d("l4.docx", ["One  Two"]), lines) == 1.0
    assert m("compare_docx_files_and_ignore_new_lines")(d("l5.docx", ["One  Two"]), lines, ignore_blanks=False) == 0.0
