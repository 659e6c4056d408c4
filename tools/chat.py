"""
Chat prompts for instruct teachers (SmolLM2-Instruct, Qwen2): a user turn in the model's own
format, so the prompts of a real teacher are in the text format it was trained on. Used by
tools/generate.py, tools/demo_photo.py and tools/real_experiment.py.
"""
import json
import os


def load_chat_template(folder):
    """The Hugging Face chat_template (a Jinja string) of a model folder's tokenizer_config.json, or
    None."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):          # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def chat_prompt(user_text, template=None, system=None):
    """One user turn formatted for an instruct model, ending where the assistant's answer
    starts, so prompts for a real teacher are in its own format (the response then ends with
    its <|im_end|>, the eos role load_tokenizer gives SmolLM2-Instruct).

    template=None: ChatML as SmolLM2-Instruct / Qwen2 use it, written out:
        [<|im_start|>system\\n{system}<|im_end|>\\n]
        <|im_start|>user\\n{user_text}<|im_end|>\\n<|im_start|>assistant\\n
    template=a Jinja chat_template string (load_chat_template): rendered with jinja2 in the sandbox
    transformers' apply_chat_template(add_generation_prompt=True) uses; SmolLM2's inserts its
    default system prompt when system is None. "<image>" in user_text stays a tag that
    encode_example replaces by the image tokens."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
               [{"role": "user", "content": user_text}]
    if template is None:
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
            "<|im_start|>assistant\n"
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat_prompt(template=...) needs jinja2 (pip install jinja2); "
                          "template=None writes ChatML without it") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)
