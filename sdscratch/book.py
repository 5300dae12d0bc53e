"""The course as a book: lesson order and links from book.toml.

`book.toml` names the lessons in order and holds the repository URL, the one place
it lives; the Colab and Kaggle badges of every lesson are derived from it.
"""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
KAGGLE_BADGE = "https://kaggle.com/static/images/open-in-kaggle.svg"


def load_book(path=ROOT / "book.toml") -> dict:
    """Read book.toml."""
    with open(path, "rb") as file:
        return tomllib.load(file)


def repository(book: dict) -> str:
    """'https://github.com/owner/name' -> 'owner/name'."""
    url = book["output"]["html"]["git-repository-url"].rstrip("/")
    return url.removeprefix("https://github.com/")


def links(book: dict, lesson_file: str) -> dict:
    """The Colab, Kaggle and GitHub addresses of a lesson on the main branch."""
    github = f"https://github.com/{repository(book)}/blob/main/lessons/{lesson_file}"
    return {
        "colab": f"https://colab.research.google.com/github/{repository(book)}"
        f"/blob/main/lessons/{lesson_file}",
        "kaggle": f"https://kaggle.com/kernels/welcome?src={github}",
        "github": github,
    }


def header_markdown(book: dict, lesson_file: str, title: str) -> str:
    """The first cell of every lesson: its title and the Open in Colab/Kaggle badges."""
    link = links(book, lesson_file)
    return (
        f"# {title}\n\n"
        f"[![Open In Colab]({COLAB_BADGE})]({link['colab']}) "
        f"[![Open In Kaggle]({KAGGLE_BADGE})]({link['kaggle']})"
    )


def setup_code(book: dict) -> str:
    """The second cell of every lesson: install sdscratch on Colab/Kaggle only."""
    return (
        "# On Colab or Kaggle, install sdscratch (with its bundled checkpoints);\n"
        "# locally, `make lab` has installed it already and this cell does nothing.\n"
        "import os\n"
        "import subprocess\n"
        "import sys\n"
        "\n"
        'if "google.colab" in sys.modules or "KAGGLE_KERNEL_RUN_TYPE" in os.environ:\n'
        '    subprocess.run([sys.executable, "-m", "pip", "install", "-q",\n'
        f'                    "sdscratch @ git+https://github.com/{repository(book)}"],\n'
        "                   check=True)"
    )
