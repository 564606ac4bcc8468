"""Node widgets that set an option show that option's help (cat_train/options_doc.NODE_WIDGETS) as their tooltip."""
from __future__ import annotations


def test_widget_tooltips_are_the_option_help(comfy):
    from conftest import pack_module

    options_doc = pack_module(comfy, "cat_train.options")
    classes = options_doc.option_classes()
    checked = 0
    for node_id, widgets in options_doc.NODE_WIDGETS.items():
        schema = comfy.nodes.NODE_CLASS_MAPPINGS[node_id].define_schema()
        inputs = {i.id: i for i in schema.inputs}
        for widget, option in widgets:
            cls_name, field_name = option.split(".")
            assert widget in inputs, f"{node_id} has no widget {widget!r}"
            assert inputs[widget].tooltip == options_doc.help_of(classes[cls_name], field_name), f"{node_id}.{widget}"
            checked += 1
    assert checked == sum(len(w) for w in options_doc.NODE_WIDGETS.values())
    # 37 + Loss Config `auto` + 11 Auto Preservation; the Training Options node's are counted apart (features append
    # them independently): every widget it has is listed, so each gets its option's help
    # + Loss Config keep_every, keep_fraction, keep_estimator
    assert sum(len(w) for n, w in options_doc.NODE_WIDGETS.items() if n != "CAT_TrainingOptions") == 52
    listed = {w for w, _ in options_doc.NODE_WIDGETS.get("CAT_TrainingOptions", [])}
    assert listed == {i.id for i in comfy.nodes.NODE_CLASS_MAPPINGS["CAT_TrainingOptions"].define_schema().inputs}
