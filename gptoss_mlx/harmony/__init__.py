"""The harmony chat format (gpt-oss.md section 4), as four small modules:

- :mod:`.messages`: special tokens, roles, channels, efforts and the message dataclasses;
- :mod:`.namespaces` and :mod:`.render`: rendering, exactly as openai/harmony's ``encoding.rs``
  (system and developer sections, the TypeScript-like tool namespaces, the built-in tool texts,
  ``<|call|>`` after tool calls, analysis dropping);
- :mod:`.parser`: the streaming parser of sampled tokens;
- :mod:`.chat_completions`: conversion to and from the OpenAI Chat Completions shape.
"""

from .chat_completions import from_chat_completions, to_chat_completions
from .messages import (
    ASSISTANT_ROLE_ID, BUILTIN_TOOLS, CALL, CHANNEL, CHANNELS, CONSTRAIN, CUTS, DEFAULT_CUTOFF,
    DEFAULT_IDENTITY, EFFORTS, END, ENDOFTEXT, MESSAGE, MESSAGE_END_TOKENS, NOT_A_CALL, RETURN, ROLES, START,
    STOP_TOKENS_FOR_SAMPLING, DeveloperContent, HarmonyError, Message, ResponseFormat,
    SystemContent, ToolNamespace, ToolSpec, check_message, ends_reply,
)
from .namespaces import (
    BROWSER_DESCRIPTION, BROWSER_TOOLS, PYTHON_DESCRIPTION, browser_namespace, python_description,
    python_namespace, schema_to_typescript, tools_section,
)
from .parser import ContentDelta, Event, MessageEnd, MessageStart, StreamParser, parse_completion
from .render import (
    Segment, Special, drop_earlier_analysis, instructions_length, render_conversation, render_message,
    segments_to_text, segments_to_tokens, system_message, today,
)
