// Helpers every k6 script shares: the start-up check that the gateway answers, a run id, and reading "accepted".
import http from 'k6/http';

// Checks that the gateway answers /healthz and returns a run id (a base-36 timestamp plus a random suffix) that
// makes every device id of the run unique. Called from setup(), so that all VUs share one id.
export function startRun(baseUrl) {
  const res = http.get(`${baseUrl}/healthz`, { tags: { name: 'healthz' } });
  if (res.status !== 200) {
    const what = res.status === 0 ? `failed (${res.error})` : `answered ${res.status}`;
    throw new Error(`GET ${baseUrl}/healthz ${what}; is the gateway running?`);
  }
  return { runId: Date.now().toString(36) + Math.floor(Math.random() * 1296).toString(36) };
}

// The "accepted" count of a 202 body, or undefined when the body is not the expected JSON.
export function accepted(res) {
  try {
    return res.json('accepted');
  } catch (e) {
    return undefined;
  }
}
