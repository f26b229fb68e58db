"""`SectionedArgumentParser`: an `HfArgumentParser` whose `--help` comes in sections, the job's own flags first.

`HfArgumentParser` puts every field of a dataclass in one argument group (named by the dataclass's
`_argument_group_name`, else the bare parser), so `TrainingArguments` subclasses print ~130 stock Trainer flags mixed
with their own. Here each dataclass is one section, titled by its `help_section` attribute (else its name), holding
the fields its own class body declares (new flags and changed stock defaults); the fields it inherits from another
dataclass go to one last section per base class, after every other section. Abbreviated flags are refused
(`allow_abbrev=False`): `--max_step 10` is an error, not `--max_steps 10`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, get_type_hints

from transformers import HfArgumentParser


def own_field_names(dtype: type) -> set[str]:
    """The fields declared in `dtype`'s own class body (not inherited), overriding ones included."""
    return set(inspect.get_annotations(dtype))


def inherited_base(dtype: type) -> type | None:
    """The nearest dataclass `dtype` derives from (`TrainingArguments` for `SimMIMTrainingArguments`), or None."""
    return next((base for base in dtype.__mro__[1:] if dataclasses.is_dataclass(base)), None)


def section_title(dtype: type) -> str:
    return getattr(dtype, "help_section", None) or dtype.__name__


class SectionedArgumentParser(HfArgumentParser):
    """`HfArgumentParser((A, B, C))` with one `--help` section per dataclass (own fields), then one per inherited
    base class (its fields), and no abbreviated flags. Parsing is unchanged: `parse_args_into_dataclasses` fills the
    same dataclasses from the same flags."""

    def __init__(self, dataclass_types: Any, **kwargs: Any) -> None:
        self._inherited_sections: list[tuple[str, list[dataclasses.Field]]] = []
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(dataclass_types, **kwargs)
        for title, fields in self._inherited_sections:
            group = self.add_argument_group(title)
            for field in fields:
                self._parse_dataclass_field(group, field)

    def _add_dataclass_arguments(self, dtype: type) -> None:
        """Called by `HfArgumentParser.__init__` for each dataclass: its own fields now, its inherited ones later."""
        try:
            hints = get_type_hints(dtype)
        except NameError as error:
            raise RuntimeError(f"Type resolution failed for {dtype}: {error}") from error
        base = inherited_base(dtype)
        own = own_field_names(dtype)
        group = self.add_argument_group(section_title(dtype), (inspect.getdoc(dtype) or "").split("\n\n")[0] or None)
        inherited = []
        for field in dataclasses.fields(dtype):
            if not field.init:
                continue
            field.type = hints[field.name]
            if base is None or field.name in own:
                self._parse_dataclass_field(group, field)
            else:
                inherited.append(field)
        if inherited:
            title = f"{base.__module__.split('.')[0]}.{base.__name__} (stock flags, unchanged)"
            self._inherited_sections.append((title, inherited))
