import pytest

from launcher.spec import tasks as spec_tasks
from ncft.continual import loop
from ncft.continual.methods import (
    CONTINUAL_METHODS,
    LORA_METHODS,
    METHODS,
    NEURON_METHODS,
    SINGLE_TASK_METHODS,
    method,
)


def test_one_table_feeds_every_reader():
    assert set(SINGLE_TASK_METHODS) | set(CONTINUAL_METHODS) == set(METHODS)
    assert not set(SINGLE_TASK_METHODS) & set(CONTINUAL_METHODS)
    assert spec_tasks.CONTINUAL_METHODS is CONTINUAL_METHODS
    assert loop.LORA_METHODS is LORA_METHODS and loop.NEURON_METHODS is NEURON_METHODS
    assert set(LORA_METHODS) == {"lora", "seqlora", "olora"}
    assert set(NEURON_METHODS) == {"neurons", "random_neurons", "ncft", "wncft"}
    assert [m for m in METHODS if METHODS[m].from_base] == ["per_task"]
    assert [m for m in METHODS if METHODS[m].mixes] == ["wncft"]
    assert [m for m in METHODS if METHODS[m].adapter_per_task] == ["olora"]
    assert method("random_neurons").random and method("olora").lora


def test_unknown_method_names_the_field():
    with pytest.raises(ValueError, match="method: unknown 'magic'"):
        method("magic")
