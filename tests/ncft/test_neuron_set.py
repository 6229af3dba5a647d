import json

import pytest
import torch
import transformers as T

from ncft.arch import get_adapter
from ncft.neuron_set import FORMAT, NeuronSet, Selection
from tests.support.tiny import ARCH_CONFIGS


def _t(*xs):
    return torch.tensor(xs, dtype=torch.int64)


def _set(spec, meta=None):
    return NeuronSet({k: Selection(a, _t(*xs)) for k, (a, xs) in spec.items()}, meta)


A = {"w1": (0, [0, 1, 2, 3]), "w2": (1, [5]), "b1": (0, [7, 8])}
B = {"w1": (0, [2, 3, 4]), "w2": (1, [5, 6]), "w3": (0, [1])}


def _triples(s):
    return {(k, v.axis, int(i)) for k, v in s.entries.items() for i in v.indices}


def test_selection_validation():
    assert Selection(1, torch.tensor([0, 2], dtype=torch.int32)).indices.dtype == torch.int64
    for axis, idx, msg in [
        (0, _t(2, 1), "sorted"),
        (0, _t(1, 1), "unique"),
        (0, _t(-1, 0), "non-negative"),
        (2, _t(0), "axis"),
        (True, _t(0), "axis"),
        (0, torch.tensor([0.0]), "integer"),
        (0, _t(0).reshape(1, 1), "1-D"),
    ]:
        with pytest.raises(ValueError, match=msg):
            Selection(axis, idx)


def test_selection_copies_input():
    idx = _t(1, 2)
    sel = Selection(0, idx)
    idx[0] = 9
    assert sel.indices.tolist() == [1, 2]


def test_set_algebra_known_answers():
    a, b = _set(A), _set(B)
    assert a.num_selected() == 7 and b.num_selected() == 6
    assert list(a.entries) == ["b1", "w1", "w2"]
    u, i, d = a.union(b), a.intersection(b), a.difference(b)
    assert _triples(u) == _triples(a) | _triples(b)
    assert _triples(i) == {("w1", 0, 2), ("w1", 0, 3), ("w2", 1, 5)}
    assert _triples(d) == {("w1", 0, 0), ("w1", 0, 1), ("b1", 0, 7), ("b1", 0, 8)}
    assert "w2" not in d.entries  # emptied entries are dropped
    assert u.meta["derived"]["op"] == "union"
    # |A ∩ B| = 3, |A ∪ B| = 7 + 6 - 3 = 10
    assert a.iou(b) == pytest.approx(0.3)
    assert a.iou(a) == 1.0
    assert NeuronSet({}).iou(NeuronSet({})) == 1.0
    assert a.iou(NeuronSet({})) == 0.0


def test_axis_conflict():
    a, c = _set(A), _set({"w1": (1, [0])})
    for op in (a.union, a.intersection, a.difference):
        with pytest.raises(ValueError, match="'w1'"):
            op(c)
    # Different axes are different triples: no overlap, no error.
    assert a.iou(c) == 0.0


def test_checksum_canonical():
    a = _set(A, {"x": 1})
    same = _set(dict(reversed(list(A.items()))), {"x": 2})
    assert a.checksum() == same.checksum()  # order- and meta-independent
    assert a.checksum() != _set({**A, "w2": (0, [5])}).checksum()
    assert a.checksum() != _set({**A, "w2": (1, [6])}).checksum()
    with_empty = NeuronSet({**a.entries, "w9": Selection(0, _t())})
    assert with_empty.checksum() == a.checksum() and "w9" not in with_empty.entries


def test_meta_must_be_json():
    with pytest.raises(ValueError, match="meta"):
        NeuronSet({}, {"bad": object()})
    with pytest.raises(ValueError, match="Selection"):
        NeuronSet({"w": _t(1)})


def test_save_load_round_trip(tmp_path):
    meta = {"model_id": "tiny", "fraction": 0.05, "layers": (1, 2), "nested": {"a": None}}
    s = _set(A, meta)
    path = tmp_path / "set.safetensors"
    s.save(path)
    sidecar = json.loads((tmp_path / "set.json").read_text())
    assert sidecar["format"] == FORMAT
    assert sidecar["entries"]["w1"] == {"axis": 0, "count": 4}
    assert sidecar["checksum"] == s.checksum()
    loaded = NeuronSet.load(str(path))
    assert loaded == s
    assert loaded.meta["layers"] == [1, 2]
    assert loaded.checksum() == s.checksum()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.json", "set.safetensors"]

    empty = tmp_path / "empty.safetensors"
    NeuronSet({}, {"k": 1}).save(empty)
    assert NeuronSet.load(empty).num_selected() == 0

    with pytest.raises(ValueError, match="safetensors"):
        s.save(tmp_path / "set.pt")


@pytest.mark.parametrize(
    "tamper, msg",
    [
        (lambda j: j["entries"]["w1"].update(count=3), "expects 3"),
        (lambda j: j.update(checksum="0" * 64), "checksum"),
        (lambda j: j["entries"]["w1"].update(axis=1), "checksum"),
        (lambda j: j.update(format="other/1"), "format"),
        (lambda j: j["entries"].pop("b1"), "do not match"),
    ],
)
def test_tampered_sidecar_fails(tmp_path, tamper, msg):
    path = tmp_path / "s.safetensors"
    _set(A).save(path)
    side = tmp_path / "s.json"
    data = json.loads(side.read_text())
    tamper(data)
    side.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=msg) as err:
        NeuronSet.load(path)
    assert "s.json" in str(err.value)


def test_swapped_tensor_file_fails(tmp_path):
    _set(A).save(tmp_path / "a.safetensors")
    _set({"w1": (0, [0, 1, 2, 9]), "w2": (1, [5]), "b1": (0, [7, 8])}).save(
        tmp_path / "b.safetensors"
    )
    (tmp_path / "b.safetensors").replace(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="checksum"):
        NeuronSet.load(tmp_path / "a.safetensors")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_from_units_round_trip(family):
    cfg = ARCH_CONFIGS[family]()
    cfg.num_hidden_layers = 3  # layer 2 is selected below
    model = T.AutoModelForCausalLM.from_config(cfg)
    blocks = get_adapter(model).mlp_blocks(model)
    units = {0: _t(5, 1, 39), 2: _t(7)}
    s = NeuronSet.from_units(blocks, units, {"scorer": "test"})
    per_unit_tensors = len(blocks[0].projections) + sum(
        1 for p in blocks[0].projections[:-1] if p.bias_fqn
    )
    assert len(s.entries) == 2 * per_unit_tensors
    back = s.units(blocks)
    assert set(back) == {0, 2}
    assert back[0].tolist() == [1, 5, 39] and back[2].tolist() == [7]
    params = dict(model.named_parameters())
    for fqn, sel in s.entries.items():
        assert int(sel.indices.max()) < params[fqn].shape[sel.axis]

    with pytest.raises(ValueError, match="layer 9"):
        NeuronSet.from_units(blocks, {9: _t(0)})
    down = blocks[0].projections[-1]
    wrong = NeuronSet({down.weight_fqn: Selection(1 - down.unit_axis, _t(0))})
    with pytest.raises(ValueError, match="not a neuron-unit selection"):
        wrong.units(blocks)


def test_equal_selections_share_one_compact_list():
    # A layer's units: the same rows of gate/up and columns of down -> one int32 list.
    units = torch.tensor([1, 4, 9])
    nset = NeuronSet({"l.gate.weight": Selection(0, units), "l.up.weight": Selection(0, units),
                      "l.down.weight": Selection(1, units.clone()),
                      "k.gate.weight": Selection(0, torch.tensor([1, 4, 8]))})
    held = {fqn: sel.compact for fqn, sel in nset.entries.items()}
    assert all(t.dtype == torch.int32 for t in held.values())
    assert held["l.gate.weight"].data_ptr() == held["l.down.weight"].data_ptr() == \
        held["l.up.weight"].data_ptr() != held["k.gate.weight"].data_ptr()
    assert nset.nbytes() == 2 * 3 * 4
    assert nset.entries["l.down.weight"].indices.dtype == torch.int64
    assert torch.equal(nset.entries["l.down.weight"].indices, units)


def test_compact_lists_round_trip_through_files(tmp_path):
    nset = NeuronSet({"a": Selection(0, torch.tensor([0, 2**31 + 5])),
                      "b": Selection(1, torch.tensor([3, 7]))})
    assert nset.entries["a"].compact.dtype == torch.int64  # past int32: kept int64
    nset.save(tmp_path / "s.safetensors")
    loaded = NeuronSet.load(tmp_path / "s.safetensors")
    assert loaded == nset and loaded.checksum() == nset.checksum()
    with pytest.raises(AttributeError):
        nset.entries["b"].axis = 0
