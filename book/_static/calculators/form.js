// The form every calculator of the book shares: labelled inputs, and a result area that
// is redrawn whenever an input changes. Runs in the browser, without a kernel and
// without any request; each calculator's own file holds its (Node-tested) arithmetic.
window.bookCalculator = function (root, fields, render) {
  const form = document.createElement("form");
  form.className = "calculator-form";
  form.addEventListener("submit", (event) => event.preventDefault());
  for (const field of fields) {
    const label = document.createElement("label");
    label.textContent = field.label + " ";
    const input = document.createElement(field.options ? "select" : "input");
    input.name = field.name;
    if (field.options) {
      for (const [value, text] of field.options) input.add(new Option(text, value));
    } else {
      Object.assign(input, { type: "number", min: field.min ?? "", max: field.max ?? "", step: field.step ?? "any" });
    }
    input.value = String(field.value);
    label.appendChild(input);
    form.appendChild(label);
  }
  const output = document.createElement("div");
  output.className = "calculator-output";
  output.setAttribute("aria-live", "polite");
  const redraw = () => {
    const values = {};
    for (const field of fields) {
      const raw = form.elements[field.name].value;
      values[field.name] = field.options ? raw : Number(raw);
    }
    try {
      render(values, output);
    } catch (error) {  // bad input: say why, as the Python does
      const message = Object.assign(document.createElement("p"), { className: "calculator-error", textContent: error.message });
      output.replaceChildren(message);
    }
  };
  form.addEventListener("input", redraw);
  root.replaceChildren(form, output);
  redraw();
};

// A small table from rows of cells; cells of the first row are headers. A cell given as
// [text, key] is marked data-result=key, for readers' tools and the book's browser tests.
window.bookTable = function (rows) {
  const table = document.createElement("table");
  table.className = "calculator-table";
  rows.forEach((row, i) => {
    const tr = table.insertRow();
    for (const cell of row) {
      const td = document.createElement(i === 0 ? "th" : "td");
      const [text, key] = Array.isArray(cell) ? cell : [cell, null];
      td.textContent = text;
      if (key) td.dataset.result = key;
      tr.appendChild(td);
    }
  });
  return table;
};
