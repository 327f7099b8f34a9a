"""save_hyperparameters, hparams in checkpoints, load_from_checkpoint (Lightning 1.9.5 semantics).

Expected values marked "1.9.5" were produced by the same classes under pytorch_lightning 1.9.5.
"""
from argparse import Namespace

import pytest
import torch
from torch import nn

from fastloop import DataModule, Module, Trainer
from fastloop.checkpoint import atomic_save, load_checkpoint
from fastloop.hparams import AttributeDict, checkpoint_entries, hyperparameters_to_log
from fastloop.testing import BoringModel, random_loader


# --------------------------------------------------------------------------- classes under test
class AllArgs(Module):
    def __init__(self, a, b=2, *args, c=3, **kw):
        super().__init__()
        self.layer = nn.Linear(2, 2)
        self.save_hyperparameters()


class ChildOfAllArgs(AllArgs):
    def __init__(self, d, **kw):
        super().__init__(a=10, **kw)


class Picked(Module):
    def __init__(self, a, b, c=3):
        super().__init__()
        self.save_hyperparameters("a", "c")


class FromConfig(Module):
    def __init__(self, conf):
        super().__init__()
        self.layer = nn.Linear(conf["width"], 1)
        self.save_hyperparameters(conf)


class WithBackbone(Module):
    def __init__(self, backbone, lr=0.1):
        super().__init__()
        self.backbone = backbone
        self.save_hyperparameters(ignore="backbone")


class Net(Module):
    """Weights and buffers to compare bit for bit; records on_load_checkpoint."""

    def __init__(self, width=4, dropout=0.5, tags=("x",)):
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(3, width), nn.BatchNorm1d(width), nn.Linear(width, 2))
        self.loaded_from = None

    def on_load_checkpoint(self, checkpoint):
        self.loaded_from = dict(checkpoint["hyper_parameters"])


class Data(DataModule):
    def __init__(self, batch_size=8, root="data"):
        super().__init__()
        self.save_hyperparameters()
        self.position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def write_checkpoint(path, module, dm=None, **extra):
    """A checkpoint laid out as the trainer writes it."""
    atomic_save({"format_version": 1, "state_dict": module.state_dict(), **checkpoint_entries(module, dm),
                 **extra}, path)
    return path


# ------------------------------------------------------------------------ save_hyperparameters
def test_all_init_arguments_with_kwargs_contents_and_without_varargs():
    m = AllArgs(1, 5, 9, 9, c=4, extra=7)
    assert list(m.hparams.items()) == [("a", 1), ("b", 5), ("c", 4), ("extra", 7)]  # 1.9.5
    assert m._hparams_name == "kwargs"
    assert type(m.hparams) is AttributeDict


def test_subclass_values_win_and_every_init_on_the_stack_counts():
    m = ChildOfAllArgs(d=1, zz=3)
    assert list(m.hparams.items()) == [("a", 10), ("b", 2), ("c", 3), ("zz", 3), ("d", 1)]  # 1.9.5


def test_child_calls_it_and_parent_does_not():
    class Parent(Module):
        def __init__(self, a, b=2):
            super().__init__()

    class Child(Parent):
        def __init__(self, a, c=7):
            super().__init__(a, b=5)
            self.save_hyperparameters()

    assert dict(Child(1).hparams) == {"a": 1, "c": 7}  # the parent's __init__ has returned: not on the stack


def test_init_without_super_call_is_found_too():
    class Plain(Module):
        def __init__(self, a):
            Module.__init__(self)
            self.save_hyperparameters()

    assert dict(Plain(3).hparams) == {"a": 3}


def test_values_are_those_of_the_locals_when_called():
    class Reassigns(Module):
        def __init__(self, a):
            super().__init__()
            a = 99
            self.save_hyperparameters()

    assert dict(Reassigns(1).hparams) == {"a": 99}  # 1.9.5


def test_called_from_a_helper_method_finds_the_init():
    class Helper(Module):
        def __init__(self, a, b):
            super().__init__()
            self.setup_hparams()

        def setup_hparams(self):
            self.save_hyperparameters("b")

    assert dict(Helper(1, 2).hparams) == {"b": 2}


def test_selected_names_and_unknown_name():
    m = Picked(1, 2)
    assert dict(m.hparams) == {"a": 1, "c": 3}
    assert m._hparams_name == "kwargs"

    class Wrong(Module):
        def __init__(self, a):
            super().__init__()
            self.save_hyperparameters("nope")

    with pytest.raises(ValueError, match=r"'nope' is not an argument of Wrong.__init__ \(found: \['a'\]\)"):
        Wrong(1)


@pytest.mark.parametrize("ignore", ["backbone", ["backbone"], ("backbone", 3)])
def test_ignore_a_module_argument(ignore):
    class M(Module):
        def __init__(self, backbone, lr=0.1):
            super().__init__()
            self.save_hyperparameters(ignore=ignore)

    assert dict(M(nn.Linear(1, 1)).hparams) == {"lr": 0.1}


def test_module_values_are_kept_when_not_ignored():
    backbone = nn.Linear(1, 1)

    class M(Module):
        def __init__(self, backbone):
            super().__init__()
            self.save_hyperparameters()

    assert M(backbone).hparams["backbone"] is backbone


def test_a_dict_argument_is_the_whole_set_named_after_its_argument():
    conf = {"width": 3, "tags": [1, 2]}
    m = FromConfig(conf)
    assert dict(m.hparams) == conf and m._hparams_name == "conf"  # 1.9.5
    assert m.hparams is not conf  # an AttributeDict copy of the mapping


def test_a_namespace_argument():
    class FromNamespace(Module):
        def __init__(self, conf):
            super().__init__()
            self.save_hyperparameters(conf)

    m = FromNamespace(Namespace(width=2, depth=5))
    assert dict(m.hparams) == {"width": 2, "depth": 5} and m._hparams_name == "conf"


def test_a_dict_that_is_no_argument_has_no_name():
    class M(Module):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters({"lr": 1.0})

    m = M()
    assert dict(m.hparams) == {"lr": 1.0} and m._hparams_name is None


def test_empty_container_records_nothing_and_bad_single_values_are_errors():
    class Empty(Module):
        def __init__(self, a):
            super().__init__()
            self.save_hyperparameters({})

    e = Empty(1)
    assert dict(e.hparams) == {} and not hasattr(e, "_hparams_name")

    class Primitive(Module):
        def __init__(self, a):
            super().__init__()
            self.save_hyperparameters(5)

    with pytest.raises(ValueError, match=r"save_hyperparameters\(5\): a single value"):
        Primitive(1)

    class Unsupported(Module):
        def __init__(self, a):
            super().__init__()
            self.save_hyperparameters(object())

    with pytest.raises(ValueError, match="unsupported config type object"):
        Unsupported(1)


def test_second_call_adds_to_the_first():
    class Twice(Module):
        def __init__(self, a, b):
            super().__init__()
            self.save_hyperparameters("a")
            self.save_hyperparameters("b")

    t = Twice(1, 2)
    assert dict(t.hparams) == {"a": 1, "b": 2} and dict(t.hparams_initial) == {"a": 1, "b": 2}  # 1.9.5


def test_explicit_frame_argument():
    import inspect

    class M(Module):
        def __init__(self, a):
            super().__init__()
            frame = inspect.currentframe()
            self.save_hyperparameters(frame=frame)

    assert dict(M(4).hparams) == {"a": 4}


def test_hparams_attribute_and_item_access():
    m = Net(width=6)
    assert m.hparams.width == 6 and m.hparams["width"] == 6
    m.hparams.lr = 0.5
    assert m.hparams["lr"] == 0.5
    del m.hparams.lr
    assert "lr" not in m.hparams
    with pytest.raises(AttributeError, match='Missing attribute "nope"'):
        m.hparams.nope


def test_hparams_initial_is_unchanged_by_later_mutation():
    m = Net(width=6, tags=["a"])
    m.hparams.width = 100
    m.hparams.tags.append("b")
    assert dict(m.hparams_initial) == {"width": 6, "dropout": 0.5, "tags": ["a"]}
    m.hparams_initial["width"] = 0  # a fresh copy every time
    assert m.hparams_initial.width == 6


def test_no_hyperparameters():
    m = BoringModel()
    assert m.hparams == {} and m.hparams_initial == {} and m._log_hyperparams is False


def test_attribute_dict_repr_as_lightning():
    ad = AttributeDict({"key2": "abc", "key1": 1})
    ad.update({"my-key": 3.14})
    assert repr(ad) == '"key1":   1\n"key2":   abc\n"my-key": 3.14'
    assert repr(AttributeDict()) == ""


def test_datamodule_save_hyperparameters():
    dm = Data(batch_size=32)
    assert dict(dm.hparams) == {"batch_size": 32, "root": "data"}
    assert dm.trainer is None


def test_logger_flag_and_what_loggers_receive():
    class Quiet(Module):
        def __init__(self, a=1):
            super().__init__()
            self.save_hyperparameters(logger=False)

    assert Quiet()._log_hyperparams is False
    assert hyperparameters_to_log(Quiet()) is None
    assert hyperparameters_to_log(Net(), Data()) == {"width": 4, "dropout": 0.5, "tags": ("x",), "batch_size": 8,
                                                     "root": "data"}
    assert hyperparameters_to_log(Quiet(), Data()) == {"batch_size": 8, "root": "data"}

    class Clash(DataModule):
        def __init__(self, width=5):
            super().__init__()
            self.save_hyperparameters()

    with pytest.raises(ValueError, match=r"\['width'\] are in both"):
        hyperparameters_to_log(Net(), Clash())


# -------------------------------------------------------------------------- checkpoint entries
def test_checkpoint_entries_keys_and_plain_dicts():
    entries = checkpoint_entries(Net(width=5), Data(batch_size=3))
    assert entries == {
        "hparams_name": "kwargs", "hyper_parameters": {"width": 5, "dropout": 0.5, "tags": ("x",)},
        "datamodule_hparams_name": "kwargs", "datamodule_hyper_parameters": {"batch_size": 3, "root": "data"},
    }
    assert type(entries["hyper_parameters"]) is dict and type(entries["datamodule_hyper_parameters"]) is dict
    assert checkpoint_entries(BoringModel(), None) == {}
    assert checkpoint_entries(FromConfig({"width": 1}))["hparams_name"] == "conf"


def test_loadable_values_round_trip_with_weights_only(tmp_path):
    class Rich(Module):
        def __init__(self, t, size, dev, dtype, nested):
            super().__init__()
            self.save_hyperparameters()

    hp = dict(t=torch.arange(3.0), size=torch.Size([2, 3]), dev=torch.device("cpu"), dtype=torch.float16,
              nested={"a": [1, 2.5, None, True, "s", (3, 4)], 7: {"b": b"x"}})
    path = write_checkpoint(tmp_path / "rich.ckpt", Rich(**hp))
    saved = load_checkpoint(path)["hyper_parameters"]
    assert torch.equal(saved.pop("t"), hp.pop("t"))
    assert saved == hp


@pytest.mark.parametrize("value, where", [
    (nn.Linear(1, 1), r"hyperparameter 'backbone' of Holder is a torch.nn.modules.linear.Linear"),
    ({"opt": [1, Namespace(x=1)]}, r"hyperparameter 'backbone'\['opt'\]\[1\] of Holder is a argparse.Namespace"),
    (AttributeDict(x=1), r"hyperparameter 'backbone' of Holder is a fastloop.hparams.AttributeDict"),
])
def test_a_value_weights_only_cannot_read_is_an_error_at_save_time(value, where):
    class Holder(Module):
        def __init__(self, backbone, lr=0.1):
            super().__init__()
            self.save_hyperparameters()

    with pytest.raises(TypeError, match=where + r".*save_hyperparameters\(ignore=\['backbone'\]\)"):
        checkpoint_entries(Holder(value))
    assert checkpoint_entries(WithBackbone(value)) == {"hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1}}


# ------------------------------------------------------------------------ load_from_checkpoint
def test_restores_hyperparameters_and_weights_bit_for_bit(tmp_path):
    torch.manual_seed(1)
    original = Net(width=7, dropout=0.25, tags=["p", "q"])
    original.train().body(torch.randn(5, 3))  # moves the BatchNorm running statistics
    path = write_checkpoint(tmp_path / "net.ckpt", original)

    loaded = Net.load_from_checkpoint(path)
    assert type(loaded) is Net
    assert dict(loaded.hparams) == {"width": 7, "dropout": 0.25, "tags": ["p", "q"]}
    ref, got = original.state_dict(), loaded.state_dict()
    assert list(ref) == list(got)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert loaded.training  # 1.9.5 does not switch to eval mode
    assert loaded.loaded_from == {"width": 7, "dropout": 0.25, "tags": ["p", "q"]}


def test_overrides_win_and_reach_on_load_checkpoint(tmp_path):
    path = write_checkpoint(tmp_path / "net.ckpt", Net(width=7))
    loaded = Net.load_from_checkpoint(path, dropout=0.9, unknown_arg=1)  # unknown: dropped, as 1.9.5
    assert dict(loaded.hparams) == {"width": 7, "dropout": 0.9, "tags": ("x",)}
    assert loaded.loaded_from == {"width": 7, "dropout": 0.9, "tags": ("x",), "unknown_arg": 1}


def test_config_argument_is_passed_back_whole(tmp_path):
    path = write_checkpoint(tmp_path / "conf.ckpt", FromConfig({"width": 3, "depth": 2}))
    loaded = FromConfig.load_from_checkpoint(path, depth=9)
    assert dict(loaded.hparams) == {"width": 3, "depth": 9} and loaded.layer.in_features == 3


def test_kwargs_init_receives_everything(tmp_path):
    path = write_checkpoint(tmp_path / "all.ckpt", AllArgs(1, 5, c=4, extra=7))
    loaded = AllArgs.load_from_checkpoint(path, more=8)
    assert dict(loaded.hparams) == {"a": 1, "b": 5, "c": 4, "extra": 7, "more": 8}


def test_strict_false_loads_what_matches(tmp_path):
    original = Net()
    state = original.state_dict()
    del state["body.2.bias"]
    path = tmp_path / "partial.ckpt"
    atomic_save({"format_version": 1, "state_dict": state, **checkpoint_entries(original)}, path)

    with pytest.raises(RuntimeError, match=r"(?s)partial.ckpt: the checkpoint's weights do not fit Net .*body.2.bias"):
        Net.load_from_checkpoint(path)
    with pytest.warns(UserWarning, match=r"Net has weights the checkpoint lacks: \['body.2.bias'\]"):
        loaded = Net.load_from_checkpoint(path, strict=False)
    assert torch.equal(loaded.body[2].weight, original.body[2].weight)


def test_no_hyperparameters_and_a_required_argument(tmp_path):
    class Needs(Module):
        def __init__(self, width):
            super().__init__()
            self.layer = nn.Linear(width, 1)

    path = write_checkpoint(tmp_path / "needs.ckpt", Needs(2))
    with pytest.raises(TypeError, match=r"needs.ckpt'\): Needs.__init__ needs \['width'\] but the checkpoint holds no "
                                        r"hyperparameters; call save_hyperparameters\(\) in __init__ or pass them "
                                        r"as keyword arguments"):
        Needs.load_from_checkpoint(path)
    assert Needs.load_from_checkpoint(path, width=2).layer.in_features == 2


def test_hparams_file_is_not_supported(tmp_path):
    path = write_checkpoint(tmp_path / "net.ckpt", Net())
    with pytest.raises(NotImplementedError, match=r"hparams_file='h.yaml'"):
        Net.load_from_checkpoint(path, hparams_file="h.yaml")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.ckpt"):
        Net.load_from_checkpoint(tmp_path / "nothere.ckpt")


class Recording(Net):
    moves = []

    def to(self, *args, **kwargs):
        Recording.moves.append(args)
        return super().to(*args, **kwargs)


@pytest.mark.parametrize("map_location, moved_to", [
    (None, None), ("cpu", torch.device("cpu")), (torch.device("cpu"), torch.device("cpu")),
    ({"cpu": "cpu"}, None), (lambda storage, loc: storage, None),
])
def test_map_location(tmp_path, map_location, moved_to):
    path = write_checkpoint(tmp_path / "net.ckpt", Net(width=3))
    Recording.moves = []
    loaded = Recording.load_from_checkpoint(path, map_location=map_location)
    assert Recording.moves == ([] if moved_to is None else [(moved_to,)])
    assert loaded.device == torch.device("cpu") and loaded.hparams.width == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_map_location_cuda_without_cuda(tmp_path):
    path = write_checkpoint(tmp_path / "net.ckpt", Net())
    with pytest.raises(RuntimeError, match="map_location='cuda'\\): CUDA is not available"):
        Net.load_from_checkpoint(path, map_location="cuda")


@pytest.mark.gpu
def test_map_location_cuda(tmp_path):
    original = Net()
    path = write_checkpoint(tmp_path / "net.ckpt", original)
    loaded = Net.load_from_checkpoint(path, map_location="cuda")
    assert loaded.device.type == "cuda"
    assert all(torch.equal(v.cpu(), original.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_datamodule_load_from_checkpoint(tmp_path):
    dm = Data(batch_size=32)
    path = write_checkpoint(tmp_path / "dm.ckpt", Net(), dm, datamodule={"position": 5})
    loaded = Data.load_from_checkpoint(path, root="elsewhere")
    assert dict(loaded.hparams) == {"batch_size": 32, "root": "elsewhere"} and loaded.position == 5


def test_loads_a_trainer_checkpoint(tmp_path):
    model = BoringModel(hidden=8)
    trainer = Trainer(max_epochs=1, enable_progress_bar=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(model, random_loader(n=32))
    trainer.save_checkpoint(str(tmp_path / "fit.ckpt"))
    loaded = BoringModel.load_from_checkpoint(tmp_path / "fit.ckpt", hidden=8)
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


def test_hyperparameters_that_do_not_cover_a_required_argument(tmp_path):
    class Grew(Module):
        def __init__(self, width, depth):
            super().__init__()

    path = write_checkpoint(tmp_path / "old.ckpt", Net(width=2))
    with pytest.raises(TypeError, match=r"Grew.__init__ needs \['depth'\], which neither the checkpoint's "
                                        r"hyperparameters \['width', 'dropout', 'tags'\] nor"):
        Grew.load_from_checkpoint(path, strict=False)
    with pytest.warns(UserWarning, match=r"the checkpoint has weights Grew lacks: \['body.0.weight'"):
        assert Grew.load_from_checkpoint(path, strict=False, depth=1).hparams == {}
