"""The draft model's chat template, applied on the board: messages to prompt token ids.

The template is the one in the GGUF's metadata (``tokenizer.chat_template``), which the
drafts inherit from the target they are built from, rendered in a sandboxed Jinja
environment (llama-cpp-python's formatter) and tokenized with special tokens parsed and
no BOS added (as transformers' ``apply_chat_template`` does: a template that wants a BOS
writes it). tests/test_serve.py checks the ids against the target's own tokenizer.
"""

from __future__ import annotations

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from device_agent.drafter import Drafter


class ChatTemplate:
    def __init__(self, drafter: Drafter):
        metadata = drafter.llm.metadata
        template = metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"the draft model {drafter.model_id} has no chat template "
                             "(tokenizer.chat_template): use /v1/completions")

        def special(key: str) -> str:
            if key not in metadata:
                return ""
            return drafter.llm.detokenize([int(metadata[key])], special=True).decode(
                "utf-8", errors="replace")

        self._drafter = drafter
        self._format = Jinja2ChatFormatter(template, eos_token=special(
            "tokenizer.ggml.eos_token_id"), bos_token=special("tokenizer.ggml.bos_token_id"))

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text, ending where the assistant's answer begins."""
        return self._format(messages=messages).prompt

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self._drafter.tokenize(self.render(messages), add_bos=False)
