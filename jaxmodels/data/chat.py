"""Chat templates: a tokenizer's own Jinja template, rendered as Hugging Face `transformers` renders it.

A Hugging Face tokenizer directory keeps its chat template in `chat_template.jinja` or in `tokenizer_config.json`'s
`chat_template` (a string, or a list of named templates of which `default` is used), beside the special tokens
(`bos_token`, `eos_token`, ...) the template may name. `ChatTemplate.render(messages, add_generation_prompt)` gives
the text `transformers`' `tokenizer.apply_chat_template(messages, tokenize=False)` gives: the same Jinja sandbox
(`ImmutableSandboxedEnvironment`, `trim_blocks`, `lstrip_blocks`, loop controls), the same `tojson` filter and
`raise_exception` / `strftime_now` globals, and the special tokens as variables. It is rendered here rather than
through `transformers`, which would bring torch-sized dependencies to a data loader; jinja2 comes with the `text`
extra.

`ChatTemplate.pieces(messages)` cuts a conversation into (text, is_response) pieces: each assistant message's text
is what rendering through that message adds to the rendering of the messages before it with the generation prompt
(the assistant header), so the pieces join to the whole rendering and the model learns the response and its
end-of-turn tokens, nothing else.
"""

import dataclasses
import json
from datetime import datetime

from jaxmodels.runtime import extras, storage
from jaxmodels.runtime.errors import UserError

__all__ = ["ChatTemplate", "CONFIG_FILE", "directory_template", "load_chat_template", "SPECIAL_TOKENS", "TEMPLATE_FILE"]

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.47 saves a tokenizer's template
CONFIG_FILE = "tokenizer_config.json"


def _token_text(value) -> str | None:
  """A special token of tokenizer_config.json: a string, or an AddedToken dict holding its `content`."""
  return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A Jinja chat template and the special tokens it may name (`bos_token`... as text)."""

  template: str
  special_tokens: tuple[tuple[str, str], ...] = ()

  def to_json(self) -> str:
    return json.dumps({"chat_template": self.template, **dict(self.special_tokens)})

  @classmethod
  def from_json(cls, text: str) -> "ChatTemplate":
    d = json.loads(text)
    return cls(d.pop("chat_template"), tuple(sorted(d.items())))

  def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation `messages` (dicts with `role` and `content`) as text; with `add_generation_prompt` the
    assistant header follows, where the model's answer starts. UserError for a template that fails to render
    (its own `raise_exception`, or an undefined name)."""
    jinja2 = extras.require("jinja2", "a chat template")
    try:
      return _compiled(self.template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                             tools=None, documents=None, **dict(self.special_tokens))
    except jinja2.TemplateError as e:
      raise UserError(f"the chat template does not render these messages: {e}") from None

  def pieces(self, messages: list[dict]) -> list[tuple[str, bool]]:
    """(text, is_response) pieces that join to `render(messages)`: each assistant message (with its end-of-turn
    text) is a response piece. UserError if a rendering of fewer messages is not a prefix of the whole (a template
    that rewrites earlier turns, e.g. one that drops past reasoning, cannot be cut this way)."""
    out, done = [], ""
    for i, message in enumerate(messages):
      if message.get("role") != "assistant":
        continue
      head = self.render(messages[:i], add_generation_prompt=True)
      full = self.render(messages[:i + 1])
      if not (head.startswith(done) and full.startswith(head)):
        raise UserError("the chat template renders an earlier turn differently once a later one follows: its "
                        "responses cannot be told from its prompts")
      out += [(head[len(done):], False), (full[len(head):], True)]
      done = full
    whole = self.render(messages)
    if not whole.startswith(done):
      raise UserError("the chat template renders an earlier turn differently once a later one follows: its "
                      "responses cannot be told from its prompts")
    out.append((whole[len(done):], False))
    return [(text, response) for text, response in out if text]


_CACHE: dict = {}


def _compiled(template: str):
  """The template compiled in transformers' environment (`_compile_jinja_template` of
  transformers/utils/chat_template_utils.py); `{% generation %}` blocks render their body."""
  if template in _CACHE:
    return _CACHE[template]
  jinja2 = extras.require("jinja2", "a chat template")
  ext, nodes, sandbox = (extras.require(f"jinja2.{m}", "a chat template") for m in ("ext", "nodes", "sandbox"))

  class Generation(ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): the body as it is."""

    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # jinja's own escapes HTML
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[Generation, ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
  try:
    _CACHE[template] = env.from_string(template)
  except jinja2.TemplateSyntaxError as e:
    raise UserError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None
  return _CACHE[template]


def directory_template(path: str) -> ChatTemplate | None:
  """The chat template of a tokenizer directory (its `chat_template.jinja`, else `tokenizer_config.json`'s
  `chat_template`) with the special tokens its `tokenizer_config.json` (or `special_tokens_map.json`) names; None
  where it has none (or `path` is no directory). UserError for a file that is not JSON."""
  p = storage.path(path)
  if not p.is_dir():
    return None
  config = {}
  for name in ("special_tokens_map.json", CONFIG_FILE):  # the tokenizer config's tokens win, as in transformers
    if (p / name).is_file():
      try:
        config.update(json.loads(storage.read_utf8(p / name)))
      except ValueError as e:
        raise UserError(f"{p / name}: not JSON ({e})") from None
  template = config.get("chat_template")
  if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
    template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
  if (p / TEMPLATE_FILE).is_file():
    template = storage.read_utf8(p / TEMPLATE_FILE)
  if not isinstance(template, str):
    return None
  tokens = {k: t for k in SPECIAL_TOKENS if (t := _token_text(config.get(k))) is not None}
  return ChatTemplate(template, tuple(sorted(tokens.items())))


def load_chat_template(path: str) -> ChatTemplate:
  """The chat template at `path` (local or gs://): a Jinja file, or a tokenizer directory (`directory_template`).
  UserError for a path that is neither or a directory without a template."""
  p = storage.path(path)
  if p.is_file():
    return ChatTemplate(storage.read_utf8(p))
  if not p.is_dir():
    raise UserError(f"chat template not found: {path} (a .jinja file or a tokenizer directory)")
  if (template := directory_template(path)) is None:
    raise UserError(f"{path} has no chat template ({TEMPLATE_FILE}, or chat_template in {CONFIG_FILE})")
  return template
