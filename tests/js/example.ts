// A page's use of fanout.js, type-checked against fanout.d.ts (`tsc --noEmit`); a wrong
// name, event or field here fails the check (tests/test_client_js.py runs it).
import {
  FanoutClient,
  FanoutError,
  type ConnectionState,
  type Message,
  type Session,
} from "../../node/static/client/fanout.js";

async function token(): Promise<string> {
  const response = await fetch("/my-app/fanout-token");
  return ((await response.json()) as { token: string }).token;
}

const client = new FanoutClient({
  urls: ["https://chat-1.example.com", "https://chat-2.example.com"],
  deviceId: "laptop-1",
  getToken: token,
  backoff: { base: 0.5, max: 20 },
});

const shown = new Map<number, string>();
const stop = client.on("message", (frame) => {
  const message: Message = frame.message;
  shown.set(message.id, `${message.user_id}: ${message.content} (seq ${frame.seq})`);
});
client.on("message_delta", ({ message_id, delta }) => {
  shown.set(message_id, (shown.get(message_id) ?? "") + delta);
});
client.on("state", ({ state, nodeId }) => {
  const now: ConnectionState = state;
  document.title = nodeId ? `${now} (${nodeId})` : now;
});
client.on("typing", ({ user_id, is_typing }) => console.log(user_id, is_typing));
client.on("presence", ({ device_id, status }) => console.log(device_id, status === "online"));
client.on("resumed", async ({ complete }) => {
  if (complete) return;
  for await (const page of client.historyPages("some-session", { limit: 50 })) {
    for (const message of page.items) shown.set(message.id, message.content);
  }
});
client.on("error", (error) => console.warn(error.code, error.retry));

export async function chat(): Promise<void> {
  await client.connect();
  const session: Session = await client.createSession({ participants: ["bob"], agent: "ai" });
  try {
    const { id } = await client.send(session.id, "hello", { via: "example" });
    console.log("acked", id);
  } catch (error) {
    if (error instanceof FanoutError) console.warn(error.code, error.status);
  }
  client.typing(session.id, true);
  const page = await client.history(session.id, { limit: 20 });
  const newest = page.items[0];
  if (newest) client.read(session.id, newest.id);
  const sessions = await client.listSessions({ status: "running" });
  console.log(sessions.next ?? "last page", client.duplicates, client.userId);
  stop();
  client.close();
}
