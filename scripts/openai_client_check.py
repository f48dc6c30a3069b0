"""Drives a running `soma serve` with the official OpenAI Python client.

Usage: python openai_client_check.py BASE_URL API_KEY
Prints one line per check and exits non-zero on the first failure.
"""

import json
import sys

import openai
from openai import OpenAI

base, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)

chat = client.chat.completions.create(
    model="SmolLM2-135M-Instruct",
    messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    max_tokens=10,
    temperature=0,
)
text = chat.choices[0].message.content
assert text, chat
assert chat.usage.completion_tokens == 10 or chat.choices[0].finish_reason == "stop", chat
print("chat ok:", repr(text))

parts = []
final = None
usage = None
for chunk in client.chat.completions.create(
    model="SmolLM2-135M-Instruct",
    messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    max_tokens=10,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            final = c.finish_reason
assert "".join(parts) == text, (parts, text)
assert final in ("stop", "length") and usage is not None
print("stream ok")

schema = {
    "type": "object",
    "properties": {"colour": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}},
    "required": ["colour", "n"],
    "additionalProperties": False,
}
structured = client.chat.completions.create(
    model="SmolLM2-135M-Instruct",
    messages=[{"role": "user", "content": "Give a colour and a number."}],
    max_tokens=80,
    response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}},
)
value = json.loads(structured.choices[0].message.content)
assert isinstance(value["colour"], str) and isinstance(value["n"], int) and set(value) == {"colour", "n"}, value
print("json_schema ok:", value)

emb = client.embeddings.create(model="all-MiniLM-L6-v2", input=["a cat", "a dog"])
assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384, emb
assert emb.usage.prompt_tokens > 0
print("embeddings ok")

try:
    OpenAI(base_url=f"{base}/v1", api_key="sk-soma-wrong", max_retries=0).models.list()
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401 and e.code == "invalid_api_key", e
print("401 ok")

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e
print("404 ok")

try:
    client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "hi"}], logit_bias={"1": 5}
    )
    raise SystemExit("logit_bias was accepted")
except openai.BadRequestError as e:
    assert e.param == "logit_bias", e
print("400 ok")

weather = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
called = client.chat.completions.create(
    model="SmolLM2-135M-Instruct",
    messages=[{"role": "user", "content": "What is the weather in Paris?"}],
    tools=[weather],
    tool_choice={"type": "function", "function": {"name": "get_weather"}},
    max_tokens=60,
)
choice = called.choices[0]
assert choice.finish_reason == "tool_calls", choice
call = choice.message.tool_calls[0]
args = json.loads(call.function.arguments)
assert call.function.name == "get_weather" and isinstance(args["city"], str) and args["unit"] in ("c", "f"), call
answer = client.chat.completions.create(
    model="SmolLM2-135M-Instruct",
    messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"},
    ],
    tools=[weather],
    tool_choice="none",
    max_tokens=20,
)
assert answer.choices[0].message.content, answer
print("tool call ok:", call.function.arguments)

models = [m.id for m in client.models.list()]
assert models == ["SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"], models
print("models ok")
