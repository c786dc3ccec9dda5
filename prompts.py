"""Prompts: how a row is rendered for the policy (the upstream GRAIL user prompt, rebuilt from the
structured fields) and for the discriminator (the viewer's state, options by title), and the chat
prompt of each `prompt_mode`."""
from dataclasses import dataclass

from errors import UserError

# The upstream GRAIL training prompt (recipes/Qwen2.5-1.5B-Instruct/grpo/config_grail_*.yaml):
# think, then the option number, then the opinion direction.
SYSTEM_PROMPT = """You are choosing EXACTLY ONE item from the list of OPTIONS for a specific VIEWER.

Input you will see:
  • Viewer profile and optional context/history
  • An "OPTIONS:" list with items numbered 1..N
    – Each item is shown as either a title (preferred) or an id

Your job:
  • Think briefly in <think>…</think> using the viewer’s profile, context, and options.
  • Compare the top 2–3 candidates, then choose the single best option.
  • Never invent new items; choose only from the given OPTIONS list.

Output format (STRICT):
  - Always include these tags in order: <think>…</think>, <answer>…</answer>, <opinion>…</opinion>.
  - First output your hidden reasoning in <think>…</think>.
    - Reference candidates by their numbers and names (or ids) to justify the choice.
  - Next output ONLY the chosen option’s NUMBER inside <answer>…</answer>.
    - Do NOT output the name, id, or any extra text—ONLY the number.
    - Do NOT include punctuation, quotes, or a period after the number.
  - Finally output <opinion>…</opinion> with exactly one of: increase, decrease, or no_change.

Example of valid output:
  <think>
  WHY YOU THINK THIS IS THE RIGHT CHOICE
  </think>
  <answer>
  3
  </answer>
  <opinion>
  increase
  </opinion>

INVALID patterns (never do these):
  <answer>3.</answer>                 ← trailing period
  <answer>"3"</answer>                ← quoted
  <answer>Option 3</answer>           ← extra words
  <answer>Parkland …</answer>         ← name instead of number
  <opinion>maybe</opinion>            ← not one of the allowed direction tokens
"""

# Answer-only mode: the assistant turn is opened with ANSWER_PREFIX, so even a small model's first
# tokens are the option number. This is what gives a 135M model reward spread from the first step.
ANSWER_SYSTEM_PROMPT = """You predict which recommended video a specific YouTube VIEWER clicks next, and how their opinion moves.
Read the viewer's profile, what they are watching, their history and the numbered OPTIONS.
Reply with ONLY the chosen option's number inside answer tags, then increase, decrease or no_change inside opinion tags, for example: <answer>2</answer><opinion>no_change</opinion>"""
ANSWER_PREFIX = "<answer>"
CLOSE_TAG = "</answer>"
OPINION_OPEN, OPINION_CLOSE = "<opinion>", "</opinion>"


TITLE_LIMIT = 160  # upstream clips titles to 160 characters ("..." included)


def clean_text(value, limit=None):
    """Whitespace collapsed to single spaces and, with `limit`, clipped as upstream clips titles."""
    text = " ".join(str(value).split()) if value is not None else ""
    if limit and len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text


def _count(value):
    number = float(value)
    return f"{int(round(number)):,}" if abs(number - round(number)) < 1e-6 else f"{number:,.2f}"


def _positive(value):
    return value is not None and value > 0


def render_history_item(item):
    title = clean_text(item.get("title"), TITLE_LIMIT) or "(untitled)"
    details = []
    seconds, total = item.get("watch_seconds"), item.get("total_length")
    if _positive(seconds) and _positive(total):
        percent = item.get("watch_percent")
        if percent is None:  # the stored percentage wins: upstream computed it from unrounded seconds
            percent = round(min(1.0, seconds / total) * 100)
        details.append(f"watched {round(seconds)}s of {round(total)}s ({int(percent)}% complete)")
    elif _positive(seconds):
        details.append(f"watched for {round(seconds)}s")
    channel = clean_text(item.get("channel"))
    if channel:
        details.append(f"from {channel}")
    return f"{title} ({', '.join(details)})" if details else title


def render_option(index, item):
    title = clean_text(item.get("title"), TITLE_LIMIT)
    video_id = clean_text(item.get("id"))
    details = [clean_text(item.get("channel_title"))] if item.get("channel_title") else []
    if _positive(item.get("length_seconds")):
        details.append(f"{round(item['length_seconds'])}s long")
    if video_id and not title:
        details.append(f"id {video_id}")
    line = f"{index}. {title or video_id}"
    if details:
        line += f" ({', '.join(details)})"
    engagement = [f"{name} {_count(item[key])}" for name, key in
                  (("views", "view_count"), ("likes", "like_count"), ("comments", "comment_count"))
                  if item.get(key) is not None]
    if engagement:
        line += " — Engagement: " + ", ".join(engagement)
    return line


def render_current_video(row):
    title = clean_text(row.get("current_video_title"), TITLE_LIMIT)
    video_id = clean_text(row.get("current_video_id"))
    line = title or (f"video id {video_id}" if video_id else "a video")
    channel = clean_text(row.get("current_video_channel"))
    if channel:
        line += f" (from {channel})"
    if video_id and not title:
        line += f" [id {video_id}]"
    return line


def issue_label(row):
    issue = (row.get("issue") or "the issue").replace("_", " ")
    return issue[:1].upper() + issue[1:]


def render_state(row, max_history=None):
    """The viewer's state: the user prompt up to (not including) its OPTIONS section."""
    profile = row.get("viewer_profile_sentence") or "(profile information unavailable)"
    lines = [f"VIEWER {profile}"]
    if row.get("initial_viewpoint"):
        lines.append(f"Initial Viewpoint: {row['initial_viewpoint']}")
    lines += ["", f"CURRENTLY WATCHING {render_current_video(row)}"]
    history = row["watched_detailed_json"]
    if max_history and max_history > 0:
        history = history[-max_history:]
    lines += ["", "RECENTLY WATCHED (NEWEST LAST)"]
    if history:
        lines += [f"{i}. {render_history_item(item)}" for i, item in enumerate(history, 1)]
    else:
        lines.append("(no recently watched videos available)")
    if row.get("survey_highlights"):
        lines += ["", "SURVEY HIGHLIGHTS", row["survey_highlights"]]
    return "\n".join(lines)


def render_user_prompt(row, max_history=None, viewpoint_in_question=False):
    """The user turn in the upstream format; equals `state_text` when history is not truncated and
    `viewpoint_in_question` is off.

    `max_history=k` keeps the k most recent history entries (renumbered from 1); None or 0 keeps all.
    `viewpoint_in_question` repeats the viewer's initial viewpoint in the opinion question, next to
    the answer that depends on it. Missing fields render as upstream renders them.
    """
    lines = [render_state(row, max_history), "", "OPTIONS"]
    lines += [render_option(i, item) for i, item in enumerate(row["slate_items_json"], 1)]
    viewpoint = f" (Initial Viewpoint: {row['initial_viewpoint']})" \
        if viewpoint_in_question and row.get("initial_viewpoint") else ""
    lines += ["", "QUESTIONS", "1. Which option number will the viewer watch next?",
              f"2. After this recommendation, will the viewer's opinion on {issue_label(row)}{viewpoint} "
              "increase, decrease, or stay the same?"]
    return "\n".join(lines)


def option_content(item):
    """An option as its title only: what the discriminator sees of a choice. Channels, durations and
    counts are shown for some items and not others, and in the bundled gun-control slates their
    absence marks the click; a discriminator that saw them would reward that cue, not the viewer."""
    return clean_text(item.get("title"), TITLE_LIMIT) or clean_text(item.get("id"))


def build_messages(row, system_prompt, max_history=None, viewpoint_in_question=False):
    return [{"role": "system", "content": system_prompt},
            {"role": "user", "content": render_user_prompt(row, max_history, viewpoint_in_question)}]


@dataclass(frozen=True)
class PromptFormat:
    """How a row becomes the policy's prompt: `think` (the upstream prompt asking for <think>,
    <answer> and <opinion>) or `answer` (a short prompt; the assistant turn opens with <answer>),
    an optional system prompt replacing the mode's default, the history entries kept (0 = all), and
    whether the opinion question repeats the viewer's initial viewpoint."""
    mode: str = "think"
    system_prompt: str = ""
    max_history: int = 12
    viewpoint_in_question: bool = False

    @classmethod
    def of(cls, cfg):
        """The prompt of a run's config (prompt_mode, system_prompt, grail_max_history, viewpoint_in_question)."""
        return cls(cfg.prompt_mode, cfg.system_prompt, cfg.grail_max_history, cfg.viewpoint_in_question)

    @property
    def answer_only(self):
        return self.mode == "answer"

    @property
    def system(self):
        if self.system_prompt:
            return self.system_prompt
        return ANSWER_SYSTEM_PROMPT if self.answer_only else SYSTEM_PROMPT

    def text(self, tokenizer, row):
        """The chat-templated prompt, ending where the model's answer starts."""
        messages = build_messages(row, self.system, self.max_history, self.viewpoint_in_question)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text + (ANSWER_PREFIX if self.answer_only else "")


def fitting_rows(rows, tokenizer, prompt, model_config, room, name, log=print):
    """The rows whose prompt plus `room` answer tokens fit in the model's positions (its config's
    `max_position_embeddings`; none: no limit); none left of some rows is an error.
    Past its positions a rotary model still runs, on positions it never saw: its answers there are
    silently wrong, so such rows are skipped and counted on one log line."""
    positions = getattr(model_config, "max_position_embeddings", None)
    if not positions:
        return rows
    kept = []
    for row in rows:
        text = prompt.text(tokenizer, row)
        # A token spans at least one UTF-8 byte: only a text longer in bytes than the limit is tokenized.
        if len(text.encode("utf-8")) + room <= positions or \
                len(tokenizer.encode(text, add_special_tokens=False)) + room <= positions:
            kept.append(row)
    if len(kept) < len(rows):
        log(f"[data] {name}: {len(rows) - len(kept)} of {len(rows)} rows skipped (prompt_too_long: more than the "
            f"model's {positions} positions with {room} answer tokens; history is capped by grail_max_history)")
    if rows and not kept:
        raise UserError("data", f"{name}: every prompt is longer than the model's {positions} positions "
                                "(a smaller GRAIL_MAX_HISTORY shortens them)")
    return kept
