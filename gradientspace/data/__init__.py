"""Reading training and test records: files, the built-in recipes, chat templates and tokenisation."""
