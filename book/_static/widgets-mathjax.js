// The widget library typesets widget labels through MathJax 2's MathJax.Hub.Queue; the book
// serves MathJax 3, which has no Hub and typesets with typesetPromise. MathJax 3 has replaced
// its configuration object by the time the DOM is loaded; the widgets render after that.
document.addEventListener("DOMContentLoaded", () => {
  const mathjax = window.MathJax;
  if (mathjax && mathjax.startup && !mathjax.Hub) {
    mathjax.Hub = { Queue: ([, , element]) => mathjax.startup.promise.then(() => mathjax.typesetPromise([element])) };
  }
});
