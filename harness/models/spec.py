"""A registered variant as plain data: where its weights come from, how it is prompted and
decoded. What a spec's outputs are keyed by lives with its backend (harness.generate)."""

from dataclasses import asdict, dataclass, field
from typing import Any

from harness.core.hashing import content_hash
from harness.models.backend_config import BackendOptions
from harness.models.recipes import TuneSpec
from harness.models.rules_config import RulesConfig

#: The study's plain prompt (prompt_format = "plain").
PLAIN_TEMPLATE = "<|user|>\n{instruction}\n<|assistant|>\n"


@dataclass(frozen=True)
class DecodingSpec:
    """Decoding parameters: greedy by default; sampling is seeded."""

    do_sample: bool = False
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def identity(self) -> dict[str, Any]:
        """What changes outputs: greedy decoding ignores temperature, top_p and seed."""
        if not self.do_sample:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return asdict(self)


@dataclass(frozen=True)
class ModelSpec:
    """One registered variant: where its weights come from, how it is prompted and decoded."""

    name: str
    source: str = ""
    description: str = ""
    role: str = "variant"
    enabled: bool = True
    packages: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    sha256: str = ""
    model_id: str = ""
    revision: str = "main"
    path: str = ""
    gguf_file: str = ""
    prompt_format: str = "chat_template"
    system_prompt: str | None = None
    dtype: str = "float32"
    decoding: DecodingSpec = field(default_factory=DecodingSpec)
    rules: RulesConfig | None = None
    tune: TuneSpec | None = None
    backend: str = "transformers"
    backend_options: BackendOptions | None = None

    def spec_hash(self) -> str:
        """Hash of the whole spec as recorded in results."""
        return content_hash(self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for the run's resolved config."""
        d = asdict(self)
        d["rules"] = None if self.rules is None else self.rules.as_dict()
        if self.tune is None:
            del d["tune"]  # untuned variants' recorded specs (and run ids) stay as they were
        else:
            d["tune"] = {**self.tune.as_dict(), "recipe_hash": self.tune.recipe_hash()}
        if self.backend_options is None:  # transformers variants' specs stay as they were
            del d["backend"], d["backend_options"]
        else:
            d["backend_options"] = self.backend_options.as_dict()
        return d
