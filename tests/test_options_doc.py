"""docs/options.md is the rendering of the option dataclasses' help metadata, and every option has help."""
from __future__ import annotations

import dataclasses

import pytest

from cat_train import options as options_doc


def test_options_doc_is_current():
    rendered = options_doc.render()
    on_disk = options_doc.DOC.read_text(encoding="utf-8") if options_doc.DOC.is_file() else ""
    assert on_disk == rendered, f"docs/options.md is stale: run `{options_doc.REGENERATE}` and commit the file"


def test_every_option_field_has_help_and_a_row():
    doc = options_doc.render()
    for name, cls in options_doc.option_classes().items():
        for f in dataclasses.fields(cls):
            assert options_doc.help_of(cls, f.name), f"{name}.{f.name}"
            assert f"| `{f.name}` |" in doc, f"{name}.{f.name} missing from the rendered table"


def test_help_of_names_the_missing_option_and_the_fix():
    @dataclasses.dataclass
    class Bare:
        x: int = 0

    with pytest.raises(KeyError, match=r"Bare\.x has no help text: add metadata"):
        options_doc.help_of(Bare, "x")
    with pytest.raises(KeyError, match="no option 'y'; its options are: x"):
        options_doc.help_of(Bare, "y")


def test_widget_map_names_real_fields():
    classes = options_doc.option_classes()
    for node, widgets in options_doc.NODE_WIDGETS.items():
        for widget, option in widgets:
            cls_name, field_name = option.split(".")
            assert options_doc.help_of(classes[cls_name], field_name), (node, widget)


def test_check_mode_reports_a_stale_file_with_the_command(tmp_path, capsys):
    stale = tmp_path / "options.md"
    stale.write_text("# old\n")
    assert options_doc.main(["--check", "--out", str(stale)]) == 1
    assert options_doc.REGENERATE in capsys.readouterr().err
    assert options_doc.main(["--out", str(stale)]) == 0
    assert options_doc.main(["--check", "--out", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == options_doc.render()


def test_a_tooltip_names_only_widgets_a_node_has():
    """Issue 32: the `algorithm` tooltip named a `dropout` widget that no node has. A tooltip may name an option only
    by a widget some node shows (`rank`), or by its Python name (`LoraSpec.dropout`)."""
    import re

    classes = options_doc.option_classes()
    widgets = {w for ws in options_doc.NODE_WIDGETS.values() for w, _ in ws}
    fields = {f.name for cls in classes.values() for f in dataclasses.fields(cls)}
    bad = []
    for node, ws in options_doc.NODE_WIDGETS.items():
        for widget, option in ws:
            cls_name, field_name = option.split(".")
            for name in re.findall(r"`([a-z_]+)`", options_doc.help_of(classes[cls_name], field_name)):
                if name in fields and name not in widgets:
                    bad.append(f"{node}.{widget}: `{name}`")
    assert not bad, bad
