"""The safety and completeness checks every model folder passes before training uses it (no server needed)."""

from __future__ import annotations

import json
import shutil

import pytest

from ft_desk.trainer.config import ModelConfig
from ft_desk.trainer.errors import ModelError
from ft_desk.trainer.hub.download import unsafe_name
from ft_desk.trainer.hub.folder_check import foreign_code_refs, remote_code_reason
from ft_desk.trainer.hub.resolve import resolve_model_dir


def test_auto_map_only_counts_when_transformers_lacks_the_architecture():
    phi = {"model_type": "phi3", "auto_map": {"AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"}}
    assert remote_code_reason(phi) is None  # Phi-3 repos still ship modeling files transformers ignores
    custom = {"model_type": "acme_tiny", "auto_map": {"AutoConfig": "configuration_acme.AcmeConfig"}}
    assert "configuration_acme.AcmeConfig" in remote_code_reason(custom)
    tokenizer = {"tokenizer_class": "ChatGLMTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_glm.X", None]}}
    assert "tokenization_glm" in remote_code_reason({"model_type": "llama"}, tokenizer)
    native_tok = {"tokenizer_class": "LlamaTokenizerFast", "auto_map": {"AutoTokenizer": ["tok.X", None]}}
    assert remote_code_reason({"model_type": "llama"}, native_tok) is None
    assert foreign_code_refs({"auto_map": {"AutoModel": "someone/else--modeling.X"}}) == ["someone/else--modeling.X"]


@pytest.mark.parametrize("name", ["../evil", "a/../../b", "/etc/passwd", "C:evil", "a\\..\\b", "a//b", "./x", ""])
def test_names_that_escape_the_folder_are_unsafe(name):
    assert unsafe_name(name)


def test_ordinary_repo_names_are_safe():
    for name in ("config.json", "additional_chat_templates/tool.jinja", "model-00001-of-00002.safetensors"):
        assert not unsafe_name(name)


def test_local_folders_get_the_same_checks(tiny_repo_dir, tmp_path):
    folder = tmp_path / "mine"
    shutil.copytree(tiny_repo_dir, folder)
    assert resolve_model_dir(ModelConfig(name=str(folder))) == folder

    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="acme_tiny", auto_map={"AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="needs to run Python code"):
        resolve_model_dir(ModelConfig(name=str(folder)))
    with pytest.raises(ModelError, match="modeling_acme.py"):  # trusted, but the code file is missing
        resolve_model_dir(ModelConfig(name=str(folder), trust_remote_code=True))

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_repo_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ModelError, match="only pickle weights") as info:
        resolve_model_dir(ModelConfig(name=str(pickled)))
    assert "allow_pickle" in info.value.hint
    assert resolve_model_dir(ModelConfig(name=str(pickled), allow_pickle=True)) == pickled

    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_dir(ModelConfig(name=str(tmp_path / "missing" / "model")))
