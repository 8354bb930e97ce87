"""A real HTTP server on 127.0.0.1 that keeps the contract of vLLM's runtime LoRA endpoints (v0.8+,
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`), as vllm/entrypoints/openai/serving_models.py implements it:

- POST /v1/load_lora_adapter {"lora_name", "lora_path"}: 200 "Success: LoRA adapter '<name>' added successfully.";
  400 when either field is missing or the name is already loaded; 404 when no adapter is found at the path.
- POST /v1/unload_lora_adapter {"lora_name"}: 200 "... removed successfully."; 404 when the name is not loaded.
- With `--api-key`, 401 unless `Authorization: Bearer <key>`.

It records every call and can fail the next N calls to a path with 500, as a restarting server would.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


@dataclass(frozen=True)
class Call:
    path: str
    body: dict
    status: int


class VllmContractServer:
    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.loaded: dict[str, str] = {}  # lora_name -> lora_path
        self.calls: list[Call] = []
        self.failures: dict[str, int] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with server.lock:
                    status, text = server.answer(self.path, self.headers.get("Authorization"), raw)
                payload = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if status == 200 else "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def fail_next(self, path: str, times: int) -> None:
        with self.lock:
            self.failures[path] = times

    def answer(self, path: str, authorization: str | None, raw: bytes) -> tuple[int, str]:
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        status, text = self._answer(path, authorization, body)
        self.calls.append(Call(path, body, status))
        return status, text

    def _answer(self, path: str, authorization: str | None, body: dict) -> tuple[int, str]:
        if self.api_key is not None and authorization != f"Bearer {self.api_key}":
            return 401, json.dumps({"error": "Unauthorized"})
        if self.failures.get(path, 0) > 0:
            self.failures[path] -= 1
            return 500, error("InternalServerError", "engine restarting", 500)
        name, lora_path = body.get("lora_name"), body.get("lora_path")
        if path == LOAD:
            if not name or not lora_path:
                return 400, error("InvalidUserInput", "Both 'lora_name' and 'lora_path' must be provided.", 400)
            if name in self.loaded:
                return 400, error("InvalidUserInput", f"The lora adapter '{name}' has already been loaded.", 400)
            if not (Path(lora_path) / "adapter_config.json").is_file():
                return 404, error("NotFoundError", f"No adapter found for {lora_path}", 404)
            self.loaded[name] = lora_path
            return 200, f"Success: LoRA adapter '{name}' added successfully."
        if path == UNLOAD:
            if not name:
                return 400, error("InvalidUserInput", "either 'lora_name' and 'lora_int_id' needs to be provided.", 400)
            if name not in self.loaded:
                return 404, error("NotFoundError", f"The lora adapter '{name}' cannot be found.", 404)
            del self.loaded[name]
            return 200, f"Success: LoRA adapter '{name}' removed successfully."
        return 404, error("NotFoundError", "Not Found", 404)

    def stop(self) -> None:
        self.http.shutdown()


def error(kind: str, message: str, code: int) -> str:
    return json.dumps({"object": "error", "message": message, "type": kind, "param": None, "code": code})
