"""Reference retrieval for the RFA recipe: embedders and the FAISS + SQLite reference database."""
