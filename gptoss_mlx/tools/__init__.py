"""Tool use: function tools, the sandboxed python tool, the browser tool, and the tool loop."""

from .browser import Browser, ExaBackend, Page, SearchResult, fetch_page
from .functions import FunctionTool, ToolError, load_functions
from .python_tool import PythonSandbox, SandboxLimits
from .toolbox import Toolbox, ToolResult, run_with_tools

__all__ = ["Browser", "ExaBackend", "FunctionTool", "Page", "PythonSandbox", "SandboxLimits",
           "SearchResult", "ToolError", "ToolResult", "Toolbox", "fetch_page", "load_functions",
           "run_with_tools"]
