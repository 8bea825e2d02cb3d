"""Chat templates for prompts: render a task's plain prompt as one user turn of a chat model.

``RunConfig.chat_template``: ``""`` sends the task's prompt as is (the built-in model is trained
that way); ``"tokenizer"`` uses the checkpoint's own template (``tokenizer.chat_template``, e.g. a
Qwen or Llama instruct model); any other string is a Jinja template (it contains ``{{`` or
``{%``) or the path of a file holding one. Rendering is Hugging Face's ``apply_chat_template`` with
one ``{"role": "user", "content": prompt}`` message and ``add_generation_prompt=True``, as text; the
samplers then tokenize that text with the tokenizer's defaults, so a template that writes the BOS
token itself has it removed when the tokenizer adds one anyway (no double BOS).

Both samplers, the evaluation and the trainer see the same rendered prompt (it is the
``Rollouts.prompts`` text). Left out: system prompts (write them into a custom template),
multi-turn conversations, tool calls.
"""

from __future__ import annotations

from pathlib import Path

from workbench.errors import WorkbenchError, bad_value
from workbench.tasks import Example


def resolve_template(tokenizer, template: str) -> str | None:
    """The Jinja text ``template`` names, or None for no template (one-line error when unusable)."""
    if not isinstance(template, str):
        raise bad_value("chat_template", template, "'' | 'tokenizer' | a Jinja template | a template file path")
    if not template:
        return None
    if template == "tokenizer":
        tpl = getattr(tokenizer, "chat_template", None)
        if not tpl:
            raise WorkbenchError("chat_template='tokenizer' is invalid for this model: its tokenizer has no chat "
                                 "template; pass a Jinja template or a template file instead")
        return tpl
    if "{{" in template or "{%" in template:
        return template
    path = Path(template).expanduser()
    if not path.is_file():
        raise bad_value("chat_template", template,
                        "'' | 'tokenizer' | a Jinja template (with {{ or {%) | an existing template file")
    return path.read_text()


def render_prompt(tokenizer, prompt: str, template: str | None) -> str:
    """``prompt`` as one user turn with the generation prompt appended (unchanged when no template)."""
    if template is None:
        return prompt
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], chat_template=template,
                                             add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - Jinja errors become one line
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise WorkbenchError(f"chat_template cannot render a prompt: {first}") from e
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos):]
    return text


def render_examples(tokenizer, examples: list[Example], template: str | None) -> list[Example]:
    """``examples`` with rendered prompts (answers and extras unchanged)."""
    if template is None:
        return examples
    return [Example(render_prompt(tokenizer, ex.prompt, template), ex.answer, dict(ex.extra)) for ex in examples]


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


__all__ = ["resolve_template", "render_prompt", "render_examples"]
