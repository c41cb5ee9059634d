"""The file MLflow registers as the model's code ("models from code"): it names the pyfunc model to serve."""

from mlflow.models import set_model

from cxr_pneumonia.pyfunc import CxrPneumoniaModel

set_model(CxrPneumoniaModel())
