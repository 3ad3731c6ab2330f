"""Tools the server runs itself (``serve --tools python,browser --functions FILE``).

They are declared to the model beside the client's own functions (the built-ins in the system
message, as harmony does) and run between the generation rounds of the same request: the client
gets the answer they led to, and in the Responses API each call as an ``mcp_call`` item. Each request gets
its own browser and a stateless python sandbox, so nothing passes from one client to another.
Starting the server with these flags is the approval to run them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import harmony
from ..harmony import Message
from ..tools import Browser, FunctionTool, PythonSandbox, SandboxLimits, Toolbox
from ..tools.function_worker import FunctionWorkers
from ..tools.functions import FUNCTION_TIMEOUT_S
from ..tools.python_tool import description
from ..tools.toolbox import tool_recipients

MAX_ROUNDS = 8  # tool calls the server answers in one request
FUNCTION_THREADS = 16  # --functions calls running at once, over all requests (serve)


@dataclass
class ServerTools:
    functions: list[FunctionTool] = field(default_factory=list)
    python: SandboxLimits | None = None  # the python tool, with these limits, when enabled
    browser: bool = False
    browser_allow_private: bool = False  # serve --browser-allow-private
    function_timeout_s: float = FUNCTION_TIMEOUT_S
    # functions loaded from files (--functions) run in worker processes; callables in threads
    workers: FunctionWorkers | None = None

    @classmethod
    def from_toolbox(cls, toolbox: Toolbox, function_timeout_s: float = FUNCTION_TIMEOUT_S) -> "ServerTools":
        files = list(dict.fromkeys(f.source for f in toolbox.functions if f.source is not None))
        return cls(list(toolbox.functions), toolbox.python.limits if toolbox.python else None,
                   toolbox.browser is not None, bool(toolbox.browser and toolbox.browser.allow_private),
                   function_timeout_s, FunctionWorkers(files) if files else None)

    def in_worker(self, recipient: str) -> bool:
        """Whether a call to ``recipient`` runs in a worker process (a function from a file)."""
        name = recipient.removeprefix("functions.")
        return self.workers is not None and any(f.name == name and f.source is not None for f in self.functions)

    def close(self) -> None:
        if self.workers is not None:
            self.workers.close()

    def handles(self, recipient: str) -> bool:
        namespace, _, name = recipient.partition(".")
        if recipient == "python":
            return self.python is not None
        if namespace == "browser":
            return self.browser
        return namespace == "functions" and any(f.name == name for f in self.functions)

    def recipients(self) -> list[str]:
        return tool_recipients(self.functions, self.python is not None, self.browser)

    def toolbox(self) -> Toolbox:
        """A request's own tools."""
        return Toolbox(functions=self.functions,
                       python=PythonSandbox(stateful=False, limits=self.python) if self.python else None,
                       browser=Browser(allow_private=self.browser_allow_private) if self.browser else None)

    def chat_tools(self) -> list[dict]:
        """The server's functions, in the Chat Completions shape of a request's ``tools``."""
        return [{"type": "function", "function": {"name": f.spec.name, "description": f.spec.description,
                                                  "parameters": f.spec.parameters or {"type": "object", "properties": {}}}}
                for f in self.functions]

    def system_message(self, effort: str, date: str) -> Message:
        python = description(False, self.python) if self.python else None
        return harmony.system_message(effort, date, self.browser, self.python is not None,
                                      python_description=python)
