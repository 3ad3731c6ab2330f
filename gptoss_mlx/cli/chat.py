"""``gptoss-mlx chat``: the terminal chat (a REPL with line editing, saved after every reply),
or one answer when standard input is piped."""

from __future__ import annotations

import errno
import inspect
import math
import os
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from ..chat import UNRUN_CALL, Chat, ChatFileError, Done, reply_cut
from ..chat_file import check_chat_file
from ..files import REPLACEMENT, expand_user, valid_text
from ..generate import ContextLengthError, NonFiniteLogitsError
from ..loading import CheckpointError, looks_like_repo_id
from ..harmony import EFFORTS
from ..structured import SchemaError
from ..memory import cli_wording
from ..store import ConversationStore, message_count, save_target_problem, saved_elsewhere_note, title_for
from . import common
from .common import (
    CLIError, add_model_options, add_structured_options, ask_on_terminal,
    decline_when_piped, make_toolbox, terminal_safe,
)
from .lineedit import is_unfinished, line_reader, typing_hidden
from .stream import answer_once, cut_json, print_events, replies, say_cut, with_prompt_progress

CHATS_LISTED = 20  # by /chats without words

HELP = f"""Commands:
  /effort {'|'.join(EFFORTS)}   reasoning effort from the next reply
  /reasoning show|hide      show or hide the chain of thought
  /system TEXT              set the instructions (empty: remove them)
  /reset                    start a new conversation
  /chats [all|WORDS]        the saved conversations, newest first (the 20 newest, all of
                            them, or those whose title has the words)
  /load ID|PATH             continue a saved conversation
  /save PATH                save a copy (asks before overwriting)
  /stats                    statistics of the last reply
  /help, /exit
Editing: arrow keys, Ctrl-R searches earlier messages (also from earlier sessions).
Multi-line input: Alt-Enter (Esc Enter) starts a new line; so does Enter after a line ending
in \\ or inside triple quotes (a message between them is never a command, even one starting
with /). Every reply is saved; `gptoss-mlx chat --resume` continues.
Ctrl-C stops the reply (the conversation stays); Ctrl-D or /exit quits."""


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat in the terminal (reads standard input when piped)",
                       description="Chat with gpt-oss, with line editing and history; the "
                                   "conversation is saved after every reply. Piped input is "
                                   "answered once: the answer goes to standard output, the "
                                   "reasoning to standard error.")
    add_model_options(p)
    add_structured_options(p)
    p.add_argument("--hide-reasoning", action="store_true", help="do not show the chain of thought")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="ID",
                   help="continue a saved conversation (no ID: the latest); /chats lists them")
    p.set_defaults(func=cmd_chat)


def cmd_chat(args) -> int:
    if common.follow_rank0(args):  # another machine's share of the model; rank 0 does the I/O
        return 0
    if not sys.stdin.isatty():  # piped: answer once
        chat_id = resumed_id(ConversationStore(), args.resume) if args.resume is not None else None
        question = common.message_text(
            common.read_standard_input("pipe the message in: echo 'Hi' | mlx.launch ... chat"))
        if not question:
            raise CLIError("no question on standard input")
        if chat_id is not None:
            done = answer_resumed(args, question, chat_id)
        else:
            done = answer_once(args, question, decline_when_piped, not args.hide_reasoning, dim=False).done
        finish = done.finish_reason if done else None
        if say_cut(finish) and (args.json_schema or args.json_object):
            # as generate's (the README's exit status 1; 2 and "error:" said the command failed)
            print(f"gptoss-mlx: {cut_json(done)}; raise --max-tokens", file=sys.stderr)
            return 1
        return 0
    store = ConversationStore()
    chat_id = resumed_id(store, args.resume) if args.resume is not None else None
    toolbox = make_toolbox(args, ask_on_terminal)
    chat = common.load_chat(args, toolbox=toolbox)
    try:
        repl = Repl(chat, store, line_reader(store.history_file),
                    show_reasoning=not args.hide_reasoning, toolbox=toolbox)
        repl.options = resume_options(args)
        if chat_id:
            repl.open(chat_id)
            flags_over_saved(chat, args)
        return repl.run()
    finally:
        if toolbox:
            toolbox.close()


def resume_options(args) -> str:
    """The command line's options a resumed chat needs to run as this one did (the model, its
    adapter, the memory options that let it load, its tools), for the hint that resumes it: the
    hint left out --no-memory-check and --tools python, and reopened the chat without them."""
    pairs = [("--model", _absolute(args.model)), ("--adapter", _absolute(getattr(args, "adapter", None))),
             ("--memory-limit", args.memory_limit), ("--dense-bits", args.dense_bits),  # (as typed)
             ("--max-context", args.max_context), ("--tools", args.tools),
             *(("--functions", _absolute(path)) for path in args.functions)]
    if getattr(args, "python_timeout", common.PYTHON_TIMEOUT_S) != common.PYTHON_TIMEOUT_S:
        pairs.append(("--python-timeout", f"{args.python_timeout:g}"))
    # (and the tools' permissions it ran with: helper-142's, the hint reopened without them)
    flags = [flag for flag, on in (("--no-memory-check", args.no_memory_check),
                                   ("--auto-approve", getattr(args, "auto_approve", False)),
                                   ("--python-stateless", getattr(args, "python_stateless", False)),
                                   ("--python-network", getattr(args, "python_network", False)),
                                   ("--browser-allow-private", getattr(args, "browser_allow_private", False)))
             if on]
    return "".join(f" {flag} {shlex.quote(str(value))}" for flag, value in pairs if value) + \
        "".join(f" {flag}" for flag in flags)


def _absolute(value: str | None) -> str | None:
    """A local file or folder as an absolute path, for a hint pasted in another folder (a
    tester's: relative --functions paths, helper-142); a repo id, or what is not here, as typed."""
    if not value or looks_like_repo_id(value):
        return value
    try:
        path = expand_user(value)
    except FileNotFoundError:
        return value
    return str(path.absolute()) if path.exists() else value


def answer_resumed(args, question: str, chat_id: str) -> Done | None:
    """Piped ``chat --resume``: answer ``question`` in the saved chat ``chat_id`` (the answer on
    standard output, the rest on standard error) and save it there, as the terminal chat would;
    returns the reply's Done."""
    store = ConversationStore()
    toolbox = make_toolbox(args, decline_when_piped)
    chat = common.load_chat(args, toolbox=toolbox)
    try:
        defaults = chat.settings()
        title = store.load(chat, chat_id)
        tools = chat.keep_functions(defaults["functions"])
        if tools:
            print(terminal_safe(f"[functions: {tools}]"), file=sys.stderr)
        flags_over_saved(chat, args)
        done = print_events(replies(chat, question, toolbox), not args.hide_reasoning, sys.stdout,
                            sys.stderr, dim=False, json_answer=bool(args.json_schema or args.json_object))
    except (ChatFileError, ContextLengthError, NonFiniteLogitsError, SchemaError, CheckpointError) as e:
        raise CLIError(str(e)) from None
    finally:
        if toolbox:
            toolbox.close()
    try:
        chat_id, title, note = store.save_keeping_others(chat, chat_id, title)
        if note:
            print(f"[{note}]", file=sys.stderr)
        print(f"Saved to {store.path(chat_id)}", file=sys.stderr)
    except OSError as e:  # (the turn was lost: the copy the terminal chat makes, here too)
        copy = store.save_elsewhere(chat, chat_id, title)
        if copy is None:
            raise CLIError(f"could not save the conversation: {e}") from None
        print(f"[could not save to {store.path(chat_id)}: {e.strerror or e}]", file=sys.stderr)
        print(terminal_safe(saved_elsewhere_note(copy)), file=sys.stderr)
    return done


def flags_over_saved(chat: Chat, args) -> None:
    """Flags given with --resume win over the saved chat's settings."""
    if args.reasoning_effort:
        chat.reasoning_effort = args.reasoning_effort
    if args.system is not None:
        chat.instructions = args.system


def resumed_id(store: ConversationStore, chat_id: str) -> str:
    """The chat --resume names (the latest if none), checked before the model loads."""
    chat_id = chat_id or store.latest()
    if chat_id and chat_id.endswith(".json") and os.sep not in chat_id and not os.path.lexists(chat_id):
        chat_id = chat_id[:-len(".json")]  # the file's name, as the chats folder lists it (helper-158)
    if not chat_id:
        raise CLIError(store.folder_problem() or f"no saved conversations to resume in {store.root}")
    try:
        check_chat_file(store.path(chat_id))
    except ChatFileError as e:
        if os.path.isfile(chat_id):  # (a saved chat's file: /load takes a path, --resume an id;
            # before the repo test: bad/chat.json is named like a repo too, a tester's, helper-155)
            hint = f" (a chat's file: start the chat, then `/load {chat_id}`)"
        elif os.path.isdir(chat_id) or looks_like_repo_id(chat_id):
            hint = (f" ({chat_id} is a model: `gptoss-mlx chat {chat_id} --resume` resumes the latest chat "
                    "with it)")
        else:
            hint = ""
        raise CLIError(f"{e}{hint}") from None
    return chat_id


def unquoted(arg: str) -> str:
    """A path as typed after /save or /load, without the quotes a shell would take away (a
    tester's /save "" wrote a file named "", helper-155)."""
    arg = arg.strip()
    if len(arg) >= 2 and arg[0] == arg[-1] and arg[0] in "'\"":
        return arg[1:-1].strip()
    if arg[:1] in ("'", '"'):  # unbalanced: no path the user meant (a re-attack's, helper-158)
        raise ValueError(f"the quote that opens {arg[:80]} is not closed")
    return arg


def saved_chat_named(path: Path) -> str:
    """", the saved chat "TITLE" (N messages)" when ``path`` holds one: what an overwrite loses."""
    try:
        data = check_chat_file(path)
    except ChatFileError:
        return ""
    return terminal_safe(f', the saved chat "{data.get("title") or path.stem}" ({message_count(data["messages"])} messages)')


CUT_MARKS = {"interrupted": "[stopped]", "length": "[reply cut off: length limit]",
             "context": "[reply cut off: context limit]"}


def glimpse(text: str, lines: int = 6, chars: int = 600) -> str:
    """The start of a long message, for the lines that recall a resumed chat (an 88 KB paste
    filled the screen), saying how much more there is."""
    head = "\n".join(text.splitlines()[:lines])[:chars]
    if len(head) >= len(text.rstrip()):
        return text
    more = len(text.splitlines()) - len(head.splitlines())
    return head + f" … [{len(text) - len(head):,} more characters" + (f", {more:,} more lines]" if more else "]")


# A message the chat took back is offered at the next prompt where it leaves this many of the
# terminal's rows for what was said above it
DRAFT_MARGIN_ROWS = 6


class Quoted(str):
    """A message typed between triple quotes: its text as it is, never a command (a quoted
    '/etc/hosts: what is it?' was run as the command /etc/hosts:, and a quoted /exit quit)."""


class Repl:
    """The terminal chat. ``read(prompt) -> str`` reads one message (``input`` works; the
    terminal uses :func:`line_reader`, whose ``read(prompt, default)`` also offers a message the
    chat took back, to be edited or sent again); the conversation is saved in ``store`` after
    each reply."""

    def __init__(self, chat: Chat, store: ConversationStore, read: Callable[[str], str],
                 show_reasoning: bool = True, out=None, toolbox=None):
        self.chat, self.store, self.read = chat, store, read
        # what each new conversation starts from: the command line's settings and those set by
        # /system and /effort since (not a loaded chat's own)
        self.defaults = chat.settings() if chat is not None else {}
        self.show_reasoning, self.out, self.toolbox = show_reasoning, out or sys.stdout, toolbox
        self.chat_id, self.title = store.new_id(), None
        self.last_stats = None
        self.hung_up = False  # the terminal has closed: stop, save, end
        self.saving = False
        self.unsaved = False  # the chat's last save failed, and no copy holds it
        self.draft = ""  # a message the chat took back: the next prompt starts with it
        self.offers_drafts = "default" in inspect.signature(read).parameters
        self.asks_apart = "remember" in inspect.signature(read).parameters  # questions kept out of the history
        self.options = ""  # the command line's model (and adapter), for the hint that resumes the chat

    def say(self, text: str) -> None:
        if self.out is None:
            return
        try:
            print(text, file=self.out, flush=True)
        except OSError:  # the terminal has gone: what is left to say is dropped, the chat is saved
            self.out = None
            common.drop_output()

    def run(self) -> int:
        on_main = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP")
        previous = signal.signal(signal.SIGHUP, self._hang_up) if on_main else None
        try:
            self.say(f"gpt-oss ready (reasoning effort {self.chat.reasoning_effort}). /help for commands.")
            self.converse()
            if self.chat.messages:
                self.save_on_exit()
        finally:
            if on_main:
                signal.signal(signal.SIGHUP, previous)
        return 0

    def converse(self) -> None:
        while not self.hung_up:
            try:
                text = self.read_message()
            except EOFError:
                self.say("")
                break
            except KeyboardInterrupt:
                self.say("")
                continue
            except OSError as e:  # the terminal has gone (EIO)
                if e.errno not in (errno.EIO, errno.EBADF):
                    raise
                break
            if not text.strip():
                continue
            if text.startswith("/") and not isinstance(text, Quoted):
                if self.command(text.strip()) == "exit":
                    break
                continue
            self.turn(text)

    def _hang_up(self, signum, frame) -> None:
        """A closed terminal (SIGHUP): the reply under way stops as on Ctrl-C, and the chat is
        saved before the program ends."""
        self.hung_up = True
        if not self.saving:  # a save under way finishes; the program ends after it
            raise KeyboardInterrupt

    def save_on_exit(self) -> None:
        """Save (a loaded chat without a new reply is saved here too) and say where; when the
        chats folder cannot take it, a copy goes to the current directory or the temporary one,
        and the user is told how to open it. A chat resumed and left as it was is not written
        again: its file, open elsewhere too, stays the version read there."""
        if self.store.unchanged(self.chat, self.chat_id, self.title) or self.autosave():
            # the chats folder named as this run had it (the hint without it found no such chat, helper-159)
            where = os.environ.get("GPTOSS_MLX_DATA_DIR")
            folder = f"GPTOSS_MLX_DATA_DIR={shlex.quote(where)} " if where else ""
            self.say(f"Saved to {self.store.path(self.chat_id)}\n"
                     f"Continue with: {folder}gptoss-mlx chat{self.options} --resume {self.chat_id}")
            return
        self.save_elsewhere("it ends with this program")

    def save_elsewhere(self, lost: str) -> None:
        """A copy where the chats folder could not take the chat (store.save_elsewhere), and
        how to open it; ``lost`` says what happens to it when none can be written."""
        path = self.store.save_elsewhere(self.chat, self.chat_id, self.title)
        self.unsaved = path is None  # the copy holds it now (a second one would be the same)
        if path is None:
            self.say(f"error: the conversation could not be saved anywhere: {lost}")
        else:
            self.say(saved_elsewhere_note(path))

    def leave_conversation(self) -> None:
        """Before another conversation replaces this one (/reset, /load): one whose last save
        failed is saved again, else copied elsewhere, never dropped unsaved."""
        if self.unsaved and self.chat.messages and not self.autosave():
            self.save_elsewhere("it is replaced all the same")

    def read_message(self) -> str:
        """One message; a triple-quoted one loses its quotes. Reading line by line (``input``),
        a trailing backslash or an open triple quote asks for the next line."""
        draft, self.draft = self.draft, ""
        lines = [self.read(">>> ", default=draft) if draft and self.offers_drafts else self.read(">>> ")]
        while is_unfinished("\n".join(lines)):
            if lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1]
            lines.append(self.read("... "))
        text = "\n".join(lines)
        if text.strip().startswith('"""'):
            return Quoted(text.strip()[3:-3].strip("\n"))
        return text

    def turn(self, text: str) -> None:
        if valid_text(text) != text:
            self.say(f"[the message holds bytes that are not UTF-8: each is sent as {REPLACEMENT}]")
        before = len(self.chat.messages)
        events = self._saved_before_calls(replies(self.chat, text, self.toolbox))
        tty = self.out.isatty()
        shown = with_prompt_progress(events, self.chat.engine, self.out) if tty else events
        try:
            with typing_hidden():  # (typed text is not echoed into the reply; it waits for the next prompt)
                done = print_events(shown, self.show_reasoning, self.out, self.out, tty)
            self.last_stats = done.stats if done else None
            if done and done.finish_reason in ("length", "context"):
                truncated = f" ({cut_json(done)})" if self.chat.response_format else ""
                self.say(CUT_MARKS[done.finish_reason] + truncated)
        except KeyboardInterrupt:
            events.close()  # keeps the partial answer in the history now, not at GC time
            self.last_stats = self.chat.engine.stats
            if len(self.chat.messages) == before:  # nothing of the reply: the chat took the message back
                self.say("\n[stopped before the reply: the message is not in the chat" + self._offer(text) + "]")
                return
            self.say("\n" + CUT_MARKS["interrupted"])  # (print_events left no colour on)
        except OSError as e:  # the terminal has gone mid-reply: keep what was made, save, end
            if e.errno not in (errno.EIO, errno.EPIPE):
                raise
            events.close()
            self.out, self.hung_up = None, True
            common.drop_output()
        except (ContextLengthError, NonFiniteLogitsError, SchemaError, CheckpointError) as e:
            self.say(f"error: {cli_wording(str(e))}")
            if len(self.chat.messages) > before:  # a later round failed: tools had run for it
                self.say("[the message and the tool calls answered so far stay in the chat; the reply "
                         "could not go on]")
                self.autosave()
            elif self.offers_drafts:  # the chat took its message back
                self.say("[the message is not in the chat" + self._offer(text) + "]")
            return
        self.autosave()

    def _saved_before_calls(self, events):
        """``events``, the turn saved as it stands each time the model calls a tool, before the
        call runs: a function runs in this process, and one that ended it (``os._exit``, a crash
        in C) took the turn with it, without a word (a tester's, helper-157)."""
        try:
            for event in events:
                yield event
                if isinstance(event, Done) and self.chat.messages and self.chat.messages[-1].is_tool_call:
                    self.autosave()
        finally:
            events.close()  # (closed: the partial answer joins the history now, not at GC time)

    def _offer(self, text: str) -> str:
        """The next prompt starts with ``text`` (a message the chat took back), where it can and
        where it fits on a screen: a longer one (a paste too long for the context) filled the
        screen as the prompt's text and pushed the error out of sight, and Enter sent it again,
        unseen; that one is in the input history."""
        if not self.offers_drafts:
            return ""
        columns, rows = shutil.get_terminal_size()
        if sum(max(1, math.ceil(len(line) / columns)) for line in text.split("\n")) > rows - DRAFT_MARGIN_ROWS:
            return ": it is in the input history (Up brings it back, to edit or send again)"
        self.draft = f'"""{text}"""' if isinstance(text, Quoted) else text  # (still no command when sent again)
        return ": it is back at the prompt, to edit or send again"

    def autosave(self) -> bool:
        """Save after a reply; False (and said) when it could not be."""
        if self.title is None:
            first = next((m.text for m in self.chat.messages if m.role == "user"), "")
            self.title = title_for(first)
        self.saving = True
        try:
            self.chat_id, self.title, note = self.store.save_keeping_others(self.chat, self.chat_id, self.title)
        except OSError as e:
            self.say(f"error: could not save the conversation: {e}")
            self.unsaved = True
            return False
        finally:
            self.saving = False
        self.unsaved = False
        if note:
            self.say(f"[{note}]")
        return True

    def open(self, chat_id: str) -> None:
        """Continue a saved chat (raises ChatFileError; the current one then stays)."""
        self.title = self.store.load(self.chat, chat_id)
        self.chat_id, self.last_stats = chat_id, None  # /stats speaks of this chat's replies
        self.recall(f"Resumed \"{self.title}\" ({self.message_count()} messages).")

    def recall(self, header: str) -> None:
        """A chat just opened (saved, or a file's copy): keep its functions that can run here, say
        ``header``, then its last exchange, with the mark of a reply cut short when it was made
        (/load PATH said only how many messages: a tester's)."""
        tools = self.chat.keep_functions(self.defaults["functions"])  # only those that can run here
        self.new_conversation()
        messages = self.chat.messages
        shown = [i for i, m in enumerate(messages) if m.role == "user" or m.channel == "final"]
        self.say(terminal_safe(header))
        for i in shown[-2:]:
            m = messages[i]
            end = next((j for j in range(i + 1, len(messages)) if messages[j].role == "user"), len(messages))
            cut = reply_cut(messages[i:end])  # the reply was cut short when it was made
            if m.role == "user":
                self.say("you: " + terminal_safe(glimpse(m.text)))
                if cut and not any(r.channel == "final" for r in messages[i:end]):  # no answer to show
                    self.say(CUT_MARKS[cut])
                continue
            self.say("gpt-oss: " + terminal_safe(glimpse(m.text)) + (f"\n{CUT_MARKS[cut]}" if cut else ""))
        unrun = self.chat.answer_unrun_call()  # (saved before it ran, then the process ended: fe43a04)
        if unrun is not None:
            self.say(terminal_safe(f"[tool call → {unrun.recipient}] {glimpse(unrun.text)}\n"
                                   f"[result ← {unrun.recipient}] {UNRUN_CALL}"))
        if tools:
            self.say(terminal_safe(f"[functions: {tools}]"))

    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        name, arg = name.lower(), arg.strip()
        if name in ("/exit", "/quit") and not arg:
            return "exit"
        if arg and name in ("/help", "/reset", "/stats", "/exit", "/quit"):
            self.say(f"{name} takes nothing after it; /help lists the commands")
        elif name == "/help":
            self.say(HELP)
        elif name == "/effort":
            choice = arg.lower()
            if not choice:
                self.say(f"reasoning effort: {self.chat.reasoning_effort} "
                         f"(/effort {'|'.join(EFFORTS)} changes it)")
            elif choice not in EFFORTS:
                self.say(f"usage: /effort {'|'.join(EFFORTS)}")
            else:
                self.chat.reasoning_effort = self.defaults["reasoning_effort"] = choice
                self.say(f"reasoning effort: {choice} (from the next reply)")
        elif name == "/reasoning":
            choice = arg.lower()
            if not choice:  # as /effort alone says the effort
                self.say(f"reasoning: {'show' if self.show_reasoning else 'hide'} (/reasoning show|hide changes it)")
            elif choice not in ("show", "hide"):
                self.say("usage: /reasoning show|hide")
            else:
                self.show_reasoning = choice == "show"
                self.say(f"reasoning: {choice}")
        elif name == "/system":
            had = self.chat.instructions is not None
            self.chat.instructions = self.defaults["instructions"] = arg or None
            self.say(("instructions set" if arg else "instructions removed" if had else "no instructions to remove")
                     + (f" (bytes that are not UTF-8 became {REPLACEMENT})" if valid_text(arg) != arg else ""))
        elif name == "/reset":
            self.leave_conversation()
            self.chat.reset()
            self.chat.apply(self.defaults)  # not the settings of a chat /load opened
            self.chat_id, self.title, self.last_stats = self.store.new_id(), None, None
            self.new_conversation()
            self.say("new conversation")
        elif name == "/chats":
            self.list_chats(arg)
        elif name == "/load":
            self.load(arg)
        elif name == "/save":
            self.save(arg)
        elif name == "/stats":
            self.say(self.last_stats.summary() if self.last_stats else "no reply yet")
            pool = getattr(self.chat.engine.model, "expert_pool", None)
            if pool is not None:  # streamed experts: what the pool read since loading
                self.say(pool.stats.summary() + " since loading")
        else:
            self.say(f"unknown command {name}; /help lists them")
        return None

    def list_chats(self, arg: str = "") -> None:
        """/chats: the CHATS_LISTED newest; /chats all: every one; /chats WORDS: those whose
        title has every word (any case)."""
        entries = self.store.list()
        words = [] if arg.lower() == "all" else arg.lower().split()
        found = [e for e in entries if all(w in (e.title or "").lower() for w in words)]
        shown = found[:CHATS_LISTED] if not arg else found
        for e in shown:
            what = f"{e.messages} messages" if e.messages >= 0 else e.problem
            self.say(terminal_safe(f"  {e.id}  {e.title}  ({what})"))
        if len(shown) < len(found):
            self.say(f"({len(shown)} newest of {len(found)}: /chats all lists every one, "
                     "/chats WORDS those with the words in their title)")
        problem = self.store.folder_problem()
        if problem:
            self.say(f"error: {problem}")
        elif not entries:
            self.say(f"no saved conversations in {self.store.root}")
        elif not found:
            self.say(terminal_safe(f"no saved conversation has {arg!r} in its title (/chats lists the newest)"))

    def load(self, arg: str) -> None:
        """/load ID continues a saved chat; /load PATH continues a copy of a chat file."""
        try:
            arg = unquoted(arg)
        except ValueError as e:
            self.say(f"error: {e}")
            return
        if not arg:
            self.say("usage: /load ID|PATH")
            return
        self.leave_conversation()
        try:
            if self._is_saved_id(arg):
                self.open(arg)
                return
            self.title = self.store.load_path(self.chat, expand_user(arg, ChatFileError))
            self.chat_id = self.store.new_id()  # replies are saved in the store, not over PATH
            self.last_stats = None
            self.recall(f"loaded {self.message_count()} messages from {arg}")
        except ChatFileError as e:
            # made safe alone: a lone \r ending the message still shows
            self.say(terminal_safe(f"error: {e}") + "\n(the current conversation stays)")

    def new_conversation(self) -> None:
        """Tools keep nothing from the conversation before (its python session, browser pages)."""
        if self.toolbox is not None:
            self.toolbox.new_conversation()

    def message_count(self) -> int:
        """The conversation's length as the chat lists count it (store.message_count)."""
        return message_count(self.chat.to_json()["messages"])

    def _is_saved_id(self, arg: str) -> bool:
        try:
            return os.path.lexists(self.store.path(arg))  # a FIFO or a link there too: its problem is named
        except ChatFileError:  # not an id: a path
            return False

    def save(self, arg: str) -> None:
        try:
            arg = unquoted(arg)
        except ValueError as e:
            self.say(f"not saved: {e}")
            return
        if not arg:
            self.say("usage: /save PATH")
            return
        try:
            path = expand_user(arg)
        except OSError as e:
            self.say(terminal_safe(f"not saved: {e}"))
            return
        problem = save_target_problem(path)
        if problem:
            self.say(f"not saved: {path} {problem}")
            return
        try:
            if path.exists():
                question = f"{path} exists{saved_chat_named(path)}. Overwrite it? [y/N] "
                # (the answer is no message: it went into the input history, recalled by Up)
                answer = self.read(question, remember=False) if self.asks_apart else self.read(question)
                if answer.strip().lower() not in ("y", "yes"):
                    self.say("not saved")
                    return
            made = next((p for p in reversed(path.parents) if not p.exists()), None)  # the first folder made
            path = self.store.save_as(self.chat, path, self.title or "Chat")
        except (OSError, EOFError, KeyboardInterrupt) as e:
            self.say(f"not saved: {path} cannot be written ({e.strerror or e})"
                     if isinstance(e, OSError) else "not saved")
            return
        self.say(terminal_safe(f"saved to {path}" + (f" (made the folder {made})" if made else "")))

