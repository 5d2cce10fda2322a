// Minimal index page: lists series and rejections with a read key.
// Everything that comes from a DICOM file is set with textContent, never as HTML.
const $ = (id) => document.getElementById(id);
const keyStore = window.sessionStorage;

async function api(path) {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${keyStore.getItem("key")}` } });
  if (!response.ok) {
    const body = await response.json().catch(() => ({ message: response.statusText }));
    throw Object.assign(new Error(body.message), { status: response.status });
  }
  return response.json();
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const value of cells) {
    const td = document.createElement("td");
    td.textContent = value ?? "";
    tr.append(td);
  }
  return tr;
}

async function load() {
  try {
    const series = await api("/api/series?limit=1000");
    $("series").replaceChildren(...series.items.map((s) => row([
      s.patient_name || s.patient_id, s.modality, s.series_number, s.series_description,
      s.instance_count, s.status, s.last_seen])));
    const rejections = await api("/api/rejections?limit=1000");
    $("rejections").replaceChildren(...rejections.items.map((r) => row([r.path, r.reason, r.detail])));
    $("status").textContent = `${series.items.length} series`;
    $("login").hidden = true;
    $("index").hidden = false;
  } catch (error) {
    if (error.status === 401 || error.status === 403) {
      keyStore.removeItem("key");
      showLogin(error.message);
    } else {
      $("status").textContent = `error: ${error.message}`;
    }
  }
}

function showLogin(message = "") {
  $("index").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  keyStore.setItem("key", $("key").value.trim());
  load();
});
$("refresh").addEventListener("click", load);
$("logout").addEventListener("click", () => { keyStore.removeItem("key"); showLogin(); });

if (keyStore.getItem("key")) load(); else showLogin();
