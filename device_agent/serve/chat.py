"""The draft model's chat template, applied on the board: messages to prompt token ids.

The template is the draft engine's ``chat_format``: a GGUF's metadata
(``tokenizer.chat_template``), or an ONNX model directory's ``chat_template.jinja``, which
the drafts inherit from the target they are built from, rendered in a sandboxed Jinja
environment (llama-cpp-python's formatter) and tokenized with special tokens parsed and
no BOS added (as transformers' ``apply_chat_template`` does: a template that wants a BOS
writes it). tests/test_serve.py checks the ids against the target's own tokenizer.
"""

from __future__ import annotations

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from device_agent.draft_engine import DraftEngine


class ChatTemplate:
    def __init__(self, drafter: DraftEngine):
        chat = drafter.chat_format
        if chat is None:
            raise ValueError(f"the draft model {drafter.model_id} has no chat template: "
                             "use /v1/completions")
        self._drafter = drafter
        self._format = Jinja2ChatFormatter(chat.template, eos_token=chat.eos_token,
                                           bos_token=chat.bos_token)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text, ending where the assistant's answer begins."""
        return self._format(messages=messages).prompt

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self._drafter.tokenize(self.render(messages), add_bos=False)
