"""The Train tab's form, generated from `TrainConfig` itself: one field per setting.

Generating it keeps the form, the CLI and the presets on one typed config: a new setting appears
in the form with its type, choices and help text, and the form's values go back through the
config's own validation, which reports every bad field at once.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ..config import TrainConfig, parse_override_value, shortened, validate_config
from ..errors import ConfigError

# lines: a list of strings, one a line; tables: a list of settings groups, one TOML inline table a line
Kind = Literal["choice", "bool", "int", "float", "text", "list", "lines", "tables"]
# Shown above the Advanced accordion, in this order; everything else goes inside it.
BASIC_KEYS = [
    "name",
    "base_model",
    "dataset.path",
    "dataset.trigger_word",
    "dataset.resolution",
    "dataset.batch_size",
    "optimizer.max_train_steps",
    "optimizer.max_train_epochs",
    "optimizer.learning_rate",
    "lora.rank",
    "lora.alpha",
]
SKIPPED_KEYS = {"version"}  # set by migration, not by people
SECTION_TITLES = {
    "": "General",
    "dataset": "Dataset",
    "lora": "LoRA",
    "optimizer": "Optimizer and schedule",
    "sample": "Samples during training",
    "validation": "Validation and the best checkpoint",
    "regularization": "Regularization (prior preservation)",
    "save": "Saving",
}


@dataclass(frozen=True)
class FormField:
    key: str  # dotted config path, e.g. "optimizer.learning_rate"
    kind: Kind
    choices: tuple[str, ...] = ()
    optional: bool = False  # None is allowed (an empty number box)
    help: str = ""
    # Gradio's number box has no empty state: once drawn (an accordion opened) it shows None as 0 and sends 0 back.
    # For an optional number that refuses 0 (unet_lr, max_train_steps, ...) that 0 means "empty"; where 0 is a value
    # of its own (min_snr_gamma = 0 is "off", and an unset one would come back as 5) it stays 0.
    zero_means_empty: bool = False

    @property
    def section(self) -> str:
        return self.key.rpartition(".")[0]

    @property
    def label(self) -> str:
        return self.key.rpartition(".")[2].replace("_", " ")

    @property
    def elem_id(self) -> str:
        return "cfg-" + self.key.replace(".", "-")


def _kind_of(annotation: Any) -> tuple[Kind, tuple[str, ...], bool]:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        kind, choices, _ = _kind_of(args[0])
        return kind, choices, True
    if origin is Literal:
        return "choice", tuple(str(a) for a in typing.get_args(annotation)), False
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            return "tables", (), False
        return ("lines" if args == (str,) else "list"), (), False
    if annotation is bool:
        return "bool", (), False
    if annotation is int:
        return "int", (), False
    if annotation is float:
        return "float", (), False
    return "text", (), False


def _refuses_zero(info: FieldInfo) -> bool:
    """Whether the field's bounds (pydantic's gt/ge metadata) leave 0 out."""
    return any((getattr(m, "gt", None) is not None and not 0 > m.gt) or (getattr(m, "ge", None) is not None
               and not 0 >= m.ge) for m in info.metadata)  # fmt: skip


def form_field(key: str, info: FieldInfo) -> FormField:
    kind, choices, optional = _kind_of(info.annotation)
    zero_means_empty = optional and kind in ("int", "float") and _refuses_zero(info)
    return FormField(key, kind, choices, optional, info.description or "", zero_means_empty)


def config_fields() -> list[FormField]:
    """Every setting of TrainConfig as a form field, sections flattened to dotted keys."""
    fields = []
    for name, info in TrainConfig.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields += [form_field(f"{name}.{sub}", sub_info) for sub, sub_info in annotation.model_fields.items()]
        elif name not in SKIPPED_KEYS:
            fields.append(form_field(name, info))
    return fields


FIELDS = config_fields()
FIELD_BY_KEY = {f.key: f for f in FIELDS}
KEYS = [f.key for f in FIELDS]  # the order the handlers receive the form's values in


def value_at(config: TrainConfig, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def to_form_value(field: FormField, value: Any) -> Any:
    """A config value as its form component shows it (lists as TOML arrays, e.g. [0.5, 1.0])."""
    if field.kind == "lines":
        return "\n".join(value)
    if field.kind == "tables":
        return "\n".join(inline_table(item.model_dump(mode="json", exclude_defaults=True)) for item in value)
    if field.kind == "list" and value is None:
        return ""  # an optional list left empty (optimizer.betas: the optimizer's own)
    if field.kind == "list":
        # JSON numbers and strings are valid TOML, and fit one line: [0.5, 1.0]
        return "[" + ", ".join(json.dumps(item) for item in value) + "]"
    if field.kind == "choice":
        return str(value)  # a dropdown's choices are text, also those of a number (max_token_length: "150")
    return value


def inline_table(values: dict[str, Any]) -> str:
    """A TOML inline table on one line, e.g. { path = "/data/alice", repeats = 10 } (JSON strings and numbers are
    valid TOML)."""
    return "{ " + ", ".join(f"{key} = {json.dumps(value)}" for key, value in values.items()) + " }"


def parse_tables(text: str) -> list[dict[str, Any]]:
    """One TOML inline table a line, blank lines skipped; a line that is not one is named with an example."""
    tables = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        value = parse_override_value(line.strip())
        if not isinstance(value, dict):
            raise ValueError(f"line {number} ({shortened(line.strip())!r}) is not a TOML inline table; write one such "
                             'as { path = "/data/alice", repeats = 10 }')  # fmt: skip
        tables.append(value)
    return tables


def form_values(config: TrainConfig) -> list[Any]:
    """The form's values for `config`, in KEYS order."""
    return [to_form_value(FIELD_BY_KEY[k], value_at(config, k)) for k in KEYS]


def _from_form_value(field: FormField, value: Any) -> Any:
    blank = isinstance(value, str) and not value.strip()
    if value is None or (blank and (field.kind in ("int", "float") or (field.kind == "list" and field.optional))):
        return None
    if field.zero_means_empty and value == 0:
        return None
    if field.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if field.kind == "lines" and isinstance(value, str):
        return [line.strip() for line in value.splitlines() if line.strip()]
    if field.kind == "tables" and isinstance(value, str):
        return parse_tables(value)
    if field.kind == "list" and isinstance(value, str):
        try:
            return parse_override_value(value)
        except Exception:
            return value  # validation then names the field and the bad text
    return value


def config_from_form(values: list[Any]) -> TrainConfig:
    """The form's values (KEYS order) as a validated config; ConfigError lists every bad field at once."""
    if len(values) != len(KEYS):
        raise ValueError(f"expected {len(KEYS)} form values, got {len(values)}")
    data: dict[str, Any] = {}
    unreadable = []  # a field the form cannot even read is reported beside every other bad field
    for key, value in zip(KEYS, values, strict=True):
        section, _, name = key.rpartition(".")
        target = data.setdefault(section, {}) if section else data
        try:
            target[name] = _from_form_value(FIELD_BY_KEY[key], value)
        except ValueError as exc:
            unreadable.append(f"`{key}`: {exc}")
    try:
        config = validate_config(data, source="the Train form")
    except ConfigError as exc:
        raise ConfigError("the Train form", unreadable + exc.problems) from None
    if unreadable:
        raise ConfigError("the Train form", unreadable)
    return config
