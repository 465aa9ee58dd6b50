"""Chat format: the built-in renderer must reproduce Google's Gemma 4 Jinja template character for character."""

import pytest

from gemma4 import assets
from gemma4.text.chat import ChatError, ParsedResponse, ToolCall, parse_response, render_chat

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Unit"},
                "days": {"type": "integer", "description": "Forecast length", "nullable": True},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {  # arrays of scalars and of objects, nested objects, booleans, numbers, a response schema
    "type": "function",
    "function": {
        "name": "search_flights",
        "description": "Search flights.",
        "parameters": {
            "type": "object",
            "properties": {
                "Airports": {"type": "array", "items": {"type": "string"}, "description": "IATA codes"},
                "legs": {
                    "type": "array",
                    "description": "Flight legs",
                    "items": {
                        "type": "object",
                        "properties": {"from": {"type": "string"}, "date": {"type": "string", "description": "ISO"}},
                        "required": ["from"],
                    },
                },
                "filters": {
                    "type": "object",
                    "description": "Optional filters",
                    "properties": {
                        "max_price": {"type": "number"},
                        "direct": {"type": "boolean", "description": "Non-stop only"},
                        "cabin": {"type": "string", "enum": ["economy", "business"]},
                    },
                    "required": ["max_price"],
                },
                "extra": {"type": "object"},
                "tags": {"type": "array", "items": {"type": ["string", "null"], "maxItems": 3}},
                "passengers": {"type": "integer"},
            },
            "required": ["Airports", "legs"],
        },
        "response": {"type": "object", "description": "Matching flights"},
    },
}
NO_PARAMS = {"type": "function", "function": {"name": "now", "description": "Current time."}}
BARE = {"name": "add", "description": "Add numbers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}

CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                      "arguments": {"city": "Paris", "unit": "celsius", "days": 3}}}
CALL2 = {"id": "c2", "type": "function", "function": {
    "name": "search_flights",
    "arguments": {"Airports": ["CDG", "JFK"], "filters": {"max_price": 499.5, "direct": True, "cabin": None},
                  "passengers": 2, "note": 'say "hi", ok'}}}

CASES = {
    "user_only": dict(messages=[{"role": "user", "content": "Hi there!"}]),
    "system_user": dict(messages=[{"role": "system", "content": "  You are terse.\n"},
                                  {"role": "user", "content": "  Why is the sky blue?  "}]),
    "developer_role": dict(messages=[{"role": "developer", "content": "Answer in French."},
                                     {"role": "user", "content": "Hello"}]),
    "thinking_on": dict(messages=[{"role": "user", "content": "2+2?"}], enable_thinking=True),
    "thinking_on_system": dict(messages=[{"role": "system", "content": "Be careful."},
                                         {"role": "user", "content": "2+2?"}], enable_thinking=True),
    "no_generation_prompt": dict(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                                 add_generation_prompt=False),
    "multi_turn": dict(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                                 {"role": "user", "content": "Tell me a joke."}]),
    "assistant_thinking_stripped": dict(messages=[
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<|channel>thought\nlet me think<channel|>The answer is 4."},
        {"role": "user", "content": "Q2"}], enable_thinking=True),
    "tools_declared": dict(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, SEARCH, NO_PARAMS]),
    "tools_bare_schema": dict(messages=[{"role": "user", "content": "1+2"}], tools=[BARE]),
    "tools_and_system_and_thinking": dict(messages=[{"role": "system", "content": "Use tools."},
                                                    {"role": "user", "content": "Weather?"}],
                                          tools=[WEATHER], enable_thinking=True),
    "tool_call_pending": dict(messages=[{"role": "user", "content": "Weather in Paris?"},
                                        {"role": "assistant", "content": None, "tool_calls": [CALL]}], tools=[WEATHER]),
    "tool_call_and_response": dict(messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'}], tools=[WEATHER]),
    "tool_response_dict_and_answer": dict(messages=[
        {"role": "user", "content": "Flights?"},
        {"role": "assistant", "tool_calls": [CALL2, CALL],
         "tool_responses": [{"name": "search_flights", "response": {"count": 2, "ok": True, "cheapest": {"price": 410}}},
                            {"name": "get_weather", "response": "sunny"}]},
        {"role": "assistant", "content": "Two flights; sunny."},
        {"role": "user", "content": "Thanks"}], tools=[SEARCH, WEATHER]),
    "tool_messages_named_and_parts": dict(messages=[
        {"role": "user", "content": "Both please"},
        {"role": "assistant", "content": "", "tool_calls": [CALL, CALL2]},
        {"role": "tool", "name": "get_weather", "content": [{"type": "text", "text": "21 C"}, {"type": "text", "text": ", dry"}]},
        {"role": "tool", "tool_call_id": "c2", "content": "none found"},
        {"role": "assistant", "content": "It is 21 C; no flights."}], tools=[WEATHER, SEARCH]),
    "reasoning_kept_for_tool_call": dict(messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "reasoning_content": "Need the weather tool.", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"}], tools=[WEATHER], enable_thinking=True),
    "reasoning_dropped_without_call": dict(messages=[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "reasoning_content": "greet"},
        {"role": "user", "content": "Bye"}]),
    "string_arguments": dict(messages=[
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "run", "arguments": "x:1"}}]}]),
    "image_audio_video": dict(messages=[{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": " Describe this image "}, {"type": "audio"},
        {"type": "text", "text": "and the audio."}, {"type": "video"}]}]),
    "image_last": dict(messages=[{"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image"}]}]),
    "consecutive_assistant": dict(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Part one."},
                                            {"role": "assistant", "content": "Part two."}], add_generation_prompt=False),
    "model_content_list": dict(messages=[{"role": "user", "content": "Hi"},
                                         {"role": "assistant", "content": [{"type": "text", "text": "<|channel>thought\nx<channel|> Hey "}]},
                                         {"role": "user", "content": "Again"}]),
    "unicode_and_specials": dict(messages=[{"role": "system", "content": "Réponds en 日本語 🦙"},
                                           {"role": "user", "content": "<b>bold</b> & \"quotes\" \n\n tabs\t"}]),
    "empty_user": dict(messages=[{"role": "user", "content": ""}]),
}


@pytest.fixture(scope="module")
def template():
    return assets.gemma4_chat_template().read_text(encoding="utf-8")


def test_matrix_is_large_enough():
    assert len(CASES) >= 15


@pytest.mark.parametrize("name", sorted(CASES))
def test_builtin_renderer_matches_google_template(name, template):
    kwargs = CASES[name]
    expected = render_chat(template=template, **kwargs)
    assert render_chat(**kwargs) == expected


def test_known_rendering(template):
    text = render_chat([{"role": "system", "content": "Sys"}, {"role": "user", "content": "Hi"}])
    assert text == ("<bos><|turn>system\nSys<turn|>\n<|turn>user\nHi<turn|>\n"
                    "<|turn>model\n<|channel>thought\n<channel|>")
    thinking = render_chat([{"role": "user", "content": "Hi"}], enable_thinking=True)
    assert thinking == "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    tools = render_chat([{"role": "user", "content": "x"}], tools=[WEATHER])
    assert ('<|tool>declaration:get_weather{description:<|"|>Current weather for a city.<|"|>,parameters:{properties:'
            '{city:{description:<|"|>City name, e.g. Paris<|"|>,type:<|"|>STRING<|"|>},') in tools


def test_template_from_path_and_extra_globals(tmp_path):
    path = assets.gemma4_chat_template()
    msgs = [{"role": "user", "content": "Hi"}]
    assert render_chat(msgs, template=path) == render_chat(msgs)
    assert render_chat(msgs, template=str(path)) == render_chat(msgs)
    t = "{{ bos_token }}{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}" \
        "{{ strftime_now('%Y') | length }}{{ messages | tojson }}"
    assert render_chat(msgs, template=t) == '<bos>4[{"role": "user", "content": "Hi"}]'
    with pytest.raises(ChatError, match="one message only"):
        render_chat(msgs * 2, template=t)


def test_interleaved_template_renders():
    path = assets.gemma4_chat_template("google-gemma-4-31B-it-interleaved.jinja")
    text = render_chat([{"role": "user", "content": "Hi"}], template=path)
    assert text.startswith("<bos><|turn>user\nHi<turn|>\n<|turn>model\n")


def test_gemma3_format():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    assert render_chat(msgs, style="gemma3") == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\n<start_of_image>What?<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(ValueError, match="alternate"):
        render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], style="gemma3")


def test_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        render_chat([])
    with pytest.raises(ValueError, match="role"):
        render_chat([{"content": "no role"}])
    with pytest.raises(ValueError, match="unknown chat style"):
        render_chat([{"role": "user", "content": "x"}], style="llama")
    with pytest.raises(FileNotFoundError):
        render_chat([{"role": "user", "content": "x"}], template="/nonexistent/template.jinja")


# ------------------------------------------------------------------------------------------- parsing


def test_parse_thinking_answer_and_end_marker():
    out = "<|channel>thought\nThe user greets me.\nBe nice.<channel|>Hello! How are you?<turn|>ignored"
    r = parse_response(out)
    assert r.thinking == "The user greets me.\nBe nice."
    assert r.content == "Hello! How are you?"
    assert r.tool_calls == []
    assert parse_response("Plain answer<eos>") == ParsedResponse(content="Plain answer")
    truncated = parse_response("<|channel>thought\nstill thinking")
    assert truncated.thinking == "still thinking" and truncated.content == ""


def test_parse_tool_calls_with_typed_arguments():
    out = ('<|tool_call>call:search_flights{Airports:[<|"|>CDG<|"|>,<|"|>JFK<|"|>],filters:{cabin:None,direct:true,'
           'max_price:499.5},note:<|"|>say "hi", {ok}: [x]<|"|>,passengers:2}<tool_call|>'
           '<|tool_call>call:now{}<tool_call|><|tool_response>')
    r = parse_response(out)
    assert r.tool_calls == [
        ToolCall("search_flights", {"Airports": ["CDG", "JFK"], "filters": {"cabin": None, "direct": True, "max_price": 499.5},
                                    "note": 'say "hi", {ok}: [x]', "passengers": 2}),
        ToolCall("now", {}),
    ]
    assert r.content == ""


@pytest.mark.parametrize("args", [
    {"city": "Paris", "unit": "celsius", "days": 3},
    {"q": "a,b}c]", "n": -1.25, "flag": False, "nested": {"list": [1, "two", {"three": True}], "empty": {}}},
    {"unicode": "日本 🦙", "multiline": "line1\nline2", "none": None},
])
def test_tool_call_round_trip(args):
    """Render a call the way the template does, then parse it back to the same arguments."""
    msgs = [{"role": "user", "content": "go"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "fn", "arguments": args}}]}]
    prompt = render_chat(msgs, add_generation_prompt=False)
    generated = prompt[prompt.index("<|turn>model\n") + len("<|turn>model\n"):]
    r = parse_response(generated)
    assert r.tool_calls == [ToolCall("fn", args)]
    # ...and the parsed message renders back to the identical prompt.
    assert render_chat([msgs[0], r.to_message()], add_generation_prompt=False) == prompt


def test_parse_round_trip_answer_with_thinking():
    r = parse_response("<|channel>thought\nplan<channel|>Final.<turn|>")
    msgs = [{"role": "user", "content": "Q"}, r.to_message(), {"role": "user", "content": "Next"}]
    text = render_chat(msgs)
    assert "<|turn>model\nFinal.<turn|>\n" in text and "plan" not in text


def test_parse_bad_input():
    with pytest.raises(ValueError, match="unterminated tool call"):
        parse_response("<|tool_call>call:f{a:1}")
    with pytest.raises(ValueError, match="malformed tool call"):
        parse_response("<|tool_call>f(a=1)<tool_call|>")
    with pytest.raises(ValueError, match="malformed tool arguments"):
        parse_response('<|tool_call>call:f{a:<|"|>open}<tool_call|>')
    with pytest.raises(TypeError):
        parse_response([1, 2])
