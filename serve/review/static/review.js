// Keyboard answering on the rating page: 1-4 answer the current question and move on,
// Backspace undoes the last answer (on a fresh image: reopens the previous image), Enter
// submits once all are answered. The form works without this script too.
(function () {
  const form = document.getElementById("answers");
  if (!form) return;
  const questions = Array.from(form.querySelectorAll(".question"));
  const values = ["yes", "maybe", "no", "unclear"];
  const history = [];  // questions answered with the keyboard or mouse, in order

  function current() {
    return questions.find((q) => !q.querySelector("input:checked"));
  }
  function highlight() {
    questions.forEach((q) => q.classList.remove("current"));
    const q = current();
    if (q) q.classList.add("current");
  }
  form.addEventListener("change", (e) => {
    const q = e.target.closest(".question");
    const i = history.indexOf(q);
    if (i >= 0) history.splice(i, 1);
    history.push(q);
    highlight();
  });
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const index = "1234".indexOf(e.key);
    if (index >= 0) {
      const q = current();
      if (!q) return;
      const input = q.querySelector(`input[value="${values[index]}"]`);
      input.checked = true;
      input.dispatchEvent(new Event("change", { bubbles: true }));
      e.preventDefault();
    } else if (e.key === "Backspace") {
      e.preventDefault();
      const q = history.pop();
      if (q) {
        q.querySelectorAll("input").forEach((input) => (input.checked = false));
        highlight();
      } else {
        document.getElementById("undo").submit();
      }
    } else if (e.key === "Enter") {
      e.preventDefault();
      if (!current()) form.requestSubmit();
    }
  });
  highlight();
})();
